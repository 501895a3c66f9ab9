"""Entry point of the ``worker`` and ``beat`` processes: ``celery -A workers.app ...``.

The only worker module that reads the environment. A bad setting prints one line naming
the variable and stops the process.
"""

from __future__ import annotations

import os

from config.entry import load_settings
from workers import observability
from workers.celery_app import make_celery

settings = load_settings("worker", os.environ)
# Before make_celery imports the metrics: Prometheus multi-process mode is chosen at import.
observability.install(settings, os.environ)
app = make_celery(settings)
