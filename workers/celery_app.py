"""The Celery app: ``make_celery(settings)`` builds it; nothing happens at import.

Each setting of ``celery_config`` keeps a message from being lost or held for good: late
acknowledgement and a re-queue when a pool process dies (acknowledged only once its task
returned); a prefetch of 4, or twice the batch size so that a batch can fill; a visibility
timeout (``BROKER_VISIBILITY_TIMEOUT_SECONDS``) swept every 5 s at most, above every retry
countdown; 60 s hard / 50 s soft time limits; JSON only; no result backend; Sentinel, and
TLS verified as for every Redis client (``workers.queue.client``). It first applies the
patches of ``compat``: ``kombu_redis``, ``billiard_pool`` and ``celery_asynpool`` (a warm
shutdown writes the batch job on its way to a pool process whole). The tasks register
themselves at import and read the settings through ``settings_of(app)``
(``workers.app_settings``, a leaf: they never import this module). Each reason at length:
docs/architecture.md, "Celery settings".
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from celery import Celery, signals

from compat import billiard_pool, celery_asynpool, kombu_redis
from config import logs
from config.settings import Settings
from workers.app_settings import JOB_TASK_PREFIX, SETTINGS_KEY
from workers.queue import DELIVERY_QUEUE, JOBS_QUEUE
from workers.queue.client import sentinel_options, tls_options

log = logging.getLogger(__name__)


def make_celery(settings: Settings) -> Celery:
    # kombu's Redis transport with failed acks freeing their prefetch slot, so a worker
    # keeps consuming after a Redis restart under load (see compat/kombu_redis.py).
    kombu_redis.use_for_redis_urls()
    billiard_pool.shorten_pool_exit_wait()
    celery_asynpool.finish_started_writes_on_flush()  # a warm shutdown joins whole batch jobs
    app = Celery("voucherify_pipeline", set_as_current=False)
    app.conf.update(celery_config(settings))
    app.conf[SETTINGS_KEY] = settings

    # Importing them registers the tasks (shared tasks: bound to every app at finalize).
    import workers.jobs.schedule
    import workers.tasks

    workers.tasks.register(app, settings)
    workers.jobs.schedule.connect_signals()

    @signals.setup_logging.connect(weak=False)
    def _setup_logging(**_: Any) -> None:
        logs.configure(settings.log_level)

    @signals.worker_process_shutdown.connect(weak=False)
    def _close_pool(**_: Any) -> None:
        from workers.db import close_pool

        close_pool()

    return app


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery's settings (why each is what it is: docs/architecture.md, "Celery settings")."""
    return {
        "broker_url": broker_url(settings),
        "broker_transport_options": broker_transport_options(settings),
        "broker_use_ssl": tls_options(_primary_url(settings)) or False,  # False: redis://
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # a worker waits for Redis, it does not exit
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": prefetch_multiplier(settings),
        "task_time_limit": 60,
        "task_soft_time_limit": 50,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "result_backend": None,
        "task_ignore_result": True,
        "task_default_queue": DELIVERY_QUEUE,
        "task_create_missing_queues": True,
        "task_routes": {"voucherify.jobs.*": {"queue": JOBS_QUEUE}},
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "worker_enable_remote_control": False,  # no pidbox: no broadcast traffic on Redis
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "beat_schedule": beat_schedule(settings),
        "timezone": "UTC",
    }


def _primary_url(settings: Settings) -> str:
    """``REDIS_URL`` without the Sentinels: the primary's user, password, db and TLS."""
    target = settings.redis_sentinel
    return settings.redis_url if target is None else target.url


def broker_url(settings: Settings) -> str:
    """``REDIS_URL``, or with Sentinels kombu's form: one ``sentinel://`` URL per Sentinel,
    joined by ``;``, each with the primary's user, password and database number (kombu
    reads them from the first)."""
    target = settings.redis_sentinel
    if target is None:
        return settings.redis_url
    parts = urlsplit(target.url)
    userinfo = parts.netloc.rpartition("@")[0]
    prefix = f"{userinfo}@" if userinfo else ""
    path = parts.path or "/0"
    return ";".join(
        f"sentinel://{prefix}{f'[{h}]' if ':' in h else h}:{p}{path}" for h, p in target.sentinels
    )


def _sentinel_options(settings: Settings) -> dict[str, Any]:
    target = settings.redis_sentinel
    if target is None:
        return {}
    timeouts = {"socket_connect_timeout": 5, "socket_timeout": 5}
    return {
        "master_name": target.master,
        "sentinel_kwargs": sentinel_options(target.url, target.password, timeouts),
    }


def prefetch_multiplier(settings: Settings) -> int:
    """4 without batching; with it, room for two batches per process (one being applied,
    one filling), else the window caps every batch below its size and each waits out
    the flush deadline."""
    return max(4, 2 * settings.worker_batch_size)


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    return {
        **_sentinel_options(settings),
        "visibility_timeout": settings.broker_visibility_timeout_seconds,
        # Sweep for messages of vanished workers every few seconds (kombu's default sweep
        # runs every 10 x 10 s), so redelivery takes the visibility timeout plus at most
        # this, not plus 100 s.
        "unacked_restore_interval": max(1, min(5, settings.broker_visibility_timeout_seconds // 2)),
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
        "retry_on_timeout": True,
        "health_check_interval": 25,
    }


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Each job's task, sent every ``tick_seconds``; the job decides whether it is due.

    See ``workers.jobs.runner`` (why due-ness lives in ``job_runs``, not in ``beat``'s
    schedule file) and docs/reconciliation.md.
    """
    # Imported here, not at the top: the jobs import the metrics, and workers.app must set
    # Prometheus' multi-process folder before any metric exists (workers.observability).
    from workers.jobs.runner import JOBS, tick_seconds

    return {
        name: {
            "task": JOB_TASK_PREFIX + name,
            "schedule": timedelta(seconds=tick_seconds(spec, settings)),
        }
        for name, spec in JOBS.items()
        # verify is off without VOUCHERIFY_API_URL / _APP_ID / _APP_TOKEN
        if name != "verify" or settings.voucherify_api_enabled
    }
