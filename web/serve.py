"""The ``web`` process of the Procfile: check the configuration, then become gunicorn.

gunicorn reads ``WEB_CONCURRENCY`` itself when it is imported, before any configuration
file runs, and a value that is not an integer ended it with a traceback. Checking every
variable here first keeps the promise of every process: one line naming the variable,
exit status 2. Then this process is replaced by gunicorn (same pid, so SIGTERM from the
platform reaches gunicorn's master directly) with ``web/gunicorn.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from config.entry import check_settings

GUNICORN_CONFIG = Path(__file__).resolve().parent / "gunicorn.py"


def main() -> None:
    check_settings("web", os.environ)
    args = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONFIG), "web.wsgi:app"]
    os.execv(sys.executable, [*args, *sys.argv[1:]])  # noqa: S606 - our own interpreter


if __name__ == "__main__":
    main()
