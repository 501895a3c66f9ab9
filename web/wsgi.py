"""Entry point of the ``web`` process: ``gunicorn -c web/gunicorn.py web.wsgi:app``.

The only web module that reads the environment. A bad setting prints one line naming
the variable and stops the process.
"""

from __future__ import annotations

import os

from config import logs
from config.entry import load_settings
from web.app import create_app

settings = load_settings("web", os.environ)
logs.configure(settings.log_level)
app = create_app(settings)
