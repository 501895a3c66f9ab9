"""The jobs as Celery tasks (``voucherify.jobs.<name>``, routed to the ``jobs`` queue), and the
broker durability check at worker and beat start-up.

Each task is registered at import, by name, and is a thin shell around ``run_job`` with
the settings of the app it runs in: the lock, the record and the error handling are
there, so a run from the CLI behaves the same, except that a scheduled run only goes ahead
when the job is due (``run_job``'s ``when_due``: ``beat``'s own clock resets with its
process). Each job has its own time limits (its budget plus a margin), above the delivery
task's one minute.
"""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task, signals

from workers.app_settings import JOB_TASK_PREFIX, settings_of
from workers.jobs.durability import report_broker_durability
from workers.jobs.runner import JOBS, JobSpec, run_job


def _job_task(spec: JobSpec) -> Any:
    @shared_task(
        name=JOB_TASK_PREFIX + spec.name,
        bind=True,
        soft_time_limit=spec.soft_time_limit,
        time_limit=spec.time_limit,
        ignore_result=True,
    )
    def job(task: Task) -> dict[str, Any]:
        return run_job(spec.name, settings_of(task.app), when_due=True)

    return job


JOB_TASKS = {name: _job_task(spec) for name, spec in JOBS.items()}


def connect_signals() -> None:
    """The durability report at worker and beat start-up (once per process)."""
    # dispatch_uid: one handler per process, however many apps a process builds (tests).
    signals.worker_ready.connect(_worker_ready, weak=False, dispatch_uid="vfy-durability-worker")
    signals.beat_init.connect(_beat_init, weak=False, dispatch_uid="vfy-durability-beat")


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
