"""``python -m ops.cli``: the same as ``vfy-pipeline``."""

import sys

from ops.cli import main

sys.exit(main())
