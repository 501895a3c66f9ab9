"""Celery writes a few lines straight to the terminal from its signal handlers
("worker: Warm shutdown (MainProcess)") through ``celery.apps.worker.safe_say``, one
``os.write`` of plain text. ``replace_safe_say`` puts another writer in its place (the
worker's writes a JSON line, see ``workers.observability``); the handlers look the name
up in the module at call time, so replacing the module attribute is enough."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import celery.apps.worker


def replace_safe_say(say: Callable[..., Any]) -> None:
    celery.apps.worker.safe_say = say
