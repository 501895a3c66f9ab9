"""The jobs as Celery tasks (``voucherify.jobs.<name>``, routed to the ``jobs`` queue), and the
broker durability check at worker and beat start-up.

Each task is a thin shell around ``run_job``: the lock, the record and the error handling
are there, so a run from the CLI behaves the same. Each job has its own time limits (its
budget plus a margin), above the delivery task's one minute.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from config.settings import Settings
from workers.jobs.durability import report_broker_durability
from workers.jobs.runner import JOBS, JobSpec, run_job

TASK_PREFIX = "voucherify.jobs."


def register_jobs(app: Celery, settings: Settings) -> None:
    for spec in JOBS.values():
        _register(app, settings, spec)
    # dispatch_uid: one handler per process, however many apps a process builds (tests).
    signals.worker_ready.connect(_worker_ready, weak=False, dispatch_uid="vfy-durability-worker")
    signals.beat_init.connect(_beat_init, weak=False, dispatch_uid="vfy-durability-beat")


def _register(app: Celery, settings: Settings, spec: JobSpec) -> None:
    @app.task(
        name=TASK_PREFIX + spec.name,
        soft_time_limit=spec.soft_time_limit,
        time_limit=spec.time_limit,
        ignore_result=True,
    )
    def job() -> dict[str, Any]:
        return run_job(spec.name, settings)


def _broker_url(sender: Any) -> str | None:
    app = getattr(sender, "app", None)
    url = app.conf.broker_url if app is not None else None
    return str(url) if url else None


def _worker_ready(sender: Any = None, **_: Any) -> None:
    url = _broker_url(sender)
    if url:
        report_broker_durability(url, "worker")


def _beat_init(sender: Any = None, **_: Any) -> None:
    url = _broker_url(sender)
    if url:
        report_broker_durability(url, "beat")
