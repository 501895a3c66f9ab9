"""Celery writes a few lines straight to the terminal from its signal handlers
("worker: Warm shutdown (MainProcess)") through ``celery.apps.worker.safe_say``, one
``os.write`` of plain text. ``replace_safe_say`` puts another writer in its place (the
worker's writes a JSON line, see ``workers.observability``); the handlers look the name
up in the module at call time, so replacing the module attribute is enough.

Checked on celery 5.7.0 (pinned ``>=5.7,<5.8``). Upstream: celery/celery#8101 (open:
shutdown lines written raw), #8919 and #9222 (merged: stdout, and ``os.write`` kept
because a signal handler cannot log).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import celery.apps.worker


def replace_safe_say(say: Callable[..., Any]) -> None:
    celery.apps.worker.safe_say = say
