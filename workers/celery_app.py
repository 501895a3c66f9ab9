"""The Celery app: ``make_celery(settings)`` builds it; nothing happens at import.

Reliability settings, each on purpose:

- ``task_acks_late``: a message is acknowledged after its task returned, not when it was
  received, so a worker that dies mid-task leaves the message to be delivered again.
- ``task_reject_on_worker_lost``: when a pool process is killed (SIGKILL, OOM), its message
  goes back to the queue instead of being acknowledged as failed.
- ``worker_prefetch_multiplier = 4``: each process reserves a few messages ahead so it
  never waits on the broker between events; small, so a dead worker strands few and a
  long retry countdown never holds many.
- ``visibility_timeout`` (``BROKER_VISIBILITY_TIMEOUT_SECONDS``, default 300 s): a message
  reserved by a worker that vanished (its whole process group SIGKILLed) is handed out
  again after this long (plus a sweep of at most 5 s), instead of kombu's default of one
  hour plus up to 100 s. Every retry countdown is
  kept below it (``Settings.checked``), else Redis would hand a waiting retry to a second
  worker.
- ``task_time_limit`` 60 s hard / 50 s soft: one event is a few milliseconds of SQL; a
  task still running after a minute is stuck, and is killed and redelivered.
- JSON only, in and out: the message carries text, never pickles.
- No result backend: nobody reads task results; the outcome lives in PostgreSQL.
- A pool process waits at most 2 s, not billiard's 30 s, for the main process to read its
  last results before it exits (``_shorten_pool_exit_wait``): a warm shutdown stays quick.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import billiard.pool
from celery import Celery, signals

from config import logs
from config.settings import Settings
from workers import broker
from workers.messages import DELIVERY_QUEUE, JOBS_QUEUE

log = logging.getLogger(__name__)


def _shorten_pool_exit_wait() -> None:
    """Let a pool process exit 2 s after its last result, not 30 s.

    A billiard pool process that exits first waits, up to 300 x 0.1 s, until the main
    process has read every result it sent. During a warm shutdown the main process joins
    the pool without reading results, so a process that finished a task at that instant
    held the whole SIGTERM up for 30 s (tests/fault/test_worker_faults.py: 1 run in 4),
    as long as a PaaS waits before it SIGKILLs. An unread result only leaves its message
    unacknowledged: kombu hands it back, and the inbox records that second delivery as a
    duplicate. The module constant is read at each exit; pool processes inherit it.
    """
    billiard.pool.GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT = 20


def make_celery(settings: Settings) -> Celery:
    if settings.redis_url is None or settings.database_url is None:
        raise ValueError("make_celery needs settings with both URLs resolved")
    # kombu's Redis transport with failed acks freeing their prefetch slot, so a worker
    # keeps consuming after a Redis restart under load (see workers/broker.py).
    broker.use_for_redis_urls()
    _shorten_pool_exit_wait()
    app = Celery("voucherify_pipeline", set_as_current=False)
    app.conf.update(
        broker_url=settings.redis_url,
        broker_transport_options={
            "visibility_timeout": settings.broker_visibility_timeout_seconds,
            # Sweep for messages of vanished workers every few seconds (kombu's default
            # sweep runs every 10 x 10 s), so redelivery takes the visibility timeout
            # plus at most this, not plus 100 s.
            "unacked_restore_interval": max(
                1, min(5, settings.broker_visibility_timeout_seconds // 2)
            ),
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
            "retry_on_timeout": True,
            "health_check_interval": 25,
        },
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits for Redis, it does not exit
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=4,
        task_time_limit=60,
        task_soft_time_limit=50,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_default_queue=DELIVERY_QUEUE,
        task_create_missing_queues=True,
        task_routes={"voucherify.jobs.*": {"queue": JOBS_QUEUE}},
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_enable_remote_control=False,  # no pidbox: no broadcast traffic on Redis
        worker_cancel_long_running_tasks_on_connection_loss=True,
        beat_schedule=beat_schedule(settings),
        timezone="UTC",
    )
    app.conf["pipeline_settings"] = settings

    from workers import tasks
    from workers.jobs import register_jobs

    tasks.register(app, settings)
    register_jobs(app, settings)

    @signals.setup_logging.connect(weak=False)
    def _setup_logging(**_: Any) -> None:
        logs.configure(settings.log_level)

    @signals.worker_process_shutdown.connect(weak=False)
    def _close_pool(**_: Any) -> None:
        from workers.db import close_pool

        close_pool()

    return app


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Reconciliation jobs and their intervals (see the README's Operations section)."""
    schedule: dict[str, dict[str, Any]] = {
        "redrive": {
            "task": "voucherify.jobs.redrive",
            "schedule": timedelta(seconds=settings.redrive_interval_seconds),
        },
        "retention": {
            "task": "voucherify.jobs.retention",
            "schedule": timedelta(seconds=settings.retention_interval_seconds),
        },
        "drift": {
            "task": "voucherify.jobs.drift",
            "schedule": timedelta(seconds=settings.drift_interval_seconds),
        },
    }
    if settings.voucherify_api_enabled:  # off without VOUCHERIFY_API_URL / _APP_ID / _APP_TOKEN
        schedule["verify"] = {
            "task": "voucherify.jobs.verify",
            "schedule": timedelta(seconds=settings.verify_interval_seconds),
        }
    return schedule
