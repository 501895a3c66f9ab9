"""The worker configuration of ``workers.app`` with a no-op task: the drain baseline."""

from __future__ import annotations

import os
from typing import Any

from config.entry import load_settings
from workers.celery_app import make_celery

app = make_celery(load_settings("worker", os.environ))


@app.task(name="bench.noop")
def noop(**_: Any) -> None:
    return None
