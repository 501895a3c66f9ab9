"""The entry task the receiver publishes to, and the decision to retry, park or give up.

Registered at import under its stable name (``voucherify.process_delivery``) for every
Celery app the process builds; it reads the settings from its app
(``workers.celery_app.settings_of``). Thin on purpose: bind the log context, run
``process_delivery`` (one transaction), and on a transient fault retry with exponential
backoff and jitter, bounded. Nothing is lost: an event out of retries is left ``failed``
in the inbox for the re-drive job, and when even that cannot be written (PostgreSQL down
all along) the message is parked in Redis, where the re-drive job picks it up again.
"""

from __future__ import annotations

import logging
import random
import time
import traceback

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from psycopg_pool import ConnectionPool

from config import logs
from config.settings import Settings
from schemas.vocabulary import DeliveryOutcome
from workers import metrics, processing, queue
from workers.celery_app import settings_of
from workers.db import get_pool
from workers.faults import TransientError

log = logging.getLogger(__name__)


def backoff_seconds(retries: int, cap: int) -> float:
    """Exponential (1, 2, 4, ... s) capped at ``cap``, with full jitter on the upper half."""
    ceiling = min(float(cap), 2.0**retries)
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not crypto


@shared_task(name=queue.PROCESS_DELIVERY_TASK, bind=True)
def process_delivery(task: Task, body: str, delivery_id: str, received_at: str) -> str:
    settings = settings_of(task.app)
    message = queue.Message(body, delivery_id, received_at)
    retries = int(task.request.retries or 0)
    with logs.bind(delivery_id=delivery_id, attempt=retries + 1):
        started = time.perf_counter()
        pool = get_pool(
            settings.database_url,
            settings.db_pool_max_size,
            prepare_threshold=settings.db_prepare_threshold,
        )
        try:
            outcome = processing.process_delivery(pool, body, delivery_id, received_at)
        except (TransientError, SoftTimeLimitExceeded) as exc:
            return retry_or_give_up(task, settings, pool, message, exc)
        except Exception as exc:  # noqa: BLE001 - a bug: logged, kept for the re-drive job
            return give_up_on_crash(settings, pool, message, exc)
        forget(settings, message)  # recorded in PostgreSQL: the copy has done its job
        elapsed = time.perf_counter() - started
        metrics.observe_outcome(outcome, received_at, elapsed)
        log.info(
            "event." + outcome.status,
            extra={
                "event_id": outcome.event_id,
                "type": outcome.type,
                "reason": outcome.reason,
                "ms": round(elapsed * 1000, 2),
            },
        )
        return outcome.status


def retry_or_give_up(
    task: Task,
    settings: Settings,
    pool: ConnectionPool,
    message: queue.Message,
    exc: BaseException,
) -> str:
    """A transient fault: record it, then retry later or, out of retries, leave it to re-drive."""
    retries = int(task.request.retries or 0)
    max_retries = settings.event_max_retries
    error = f"{type(exc).__name__}: {exc}"
    pool.check()  # drop connections a restarted PostgreSQL left broken
    recorded = record_failure(settings, pool, message, error)
    metrics.RETRIES.inc()
    if retries >= max_retries:
        log.error("delivery.out_of_retries", extra={"error": error, "recorded": recorded})
        if not recorded:
            park(settings, message)
        return DeliveryOutcome.FAILED
    countdown = backoff_seconds(retries, settings.retry_backoff_max_seconds)
    log.warning("delivery.retry", extra={"error": error, "countdown": round(countdown, 2)})
    raise task.retry(
        countdown=countdown,
        max_retries=max_retries,
        kwargsrepr=queue.safe_kwargsrepr(message.delivery_id),
    )


def give_up_on_crash(
    settings: Settings, pool: ConnectionPool, message: queue.Message, exc: Exception
) -> str:
    """A bug (an exception nobody expected): keep the event ``failed`` for the re-drive job,
    which tries again a bounded number of times, then dead-letters it.

    The error is named by its type and where it was raised, never by its message: a
    message can quote the payload (a ``KeyError`` of a field name, a ``ValueError`` of a
    value), and ``last_error`` becomes the dead letter's reason.
    """
    error = f"crashed: {type(exc).__name__}"
    log.error("delivery.crashed", extra={"error": error, "where": _where(exc)})
    if not record_failure(settings, pool, message, error):
        park(settings, message)
    metrics.EVENTS.labels("other", DeliveryOutcome.FAILED).inc()
    return DeliveryOutcome.FAILED


def _where(exc: BaseException) -> str:
    """The innermost frame of a traceback, ``module:line function`` (no values)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown"
    frame = frames[-1]
    return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}"


def record_failure(
    settings: Settings, pool: ConnectionPool, message: queue.Message, error: str
) -> bool:
    """Mark the event failed in the inbox; once there, its accepted copy is not needed
    (the re-drive job takes over). False when even that could not be written. Never
    raises (``processing.record_failure`` and ``queue.forget`` swallow what they meet)."""
    recorded = processing.record_failure(
        pool, message.body, message.delivery_id, message.received_at, error
    )
    if recorded:
        forget(settings, message)
    return recorded


def forget(settings: Settings, message: queue.Message) -> None:
    queue.forget(queue.process_client(settings.redis_url, timeout=2), [message.delivery_id])


def park(settings: Settings, message: queue.Message) -> None:
    """Keep a delivery the database could not take (``queue.park``). If Redis is gone too,
    raising makes Celery keep the message (late ack): not lost."""
    queue.park(queue.process_client(settings.redis_url), message)
    metrics.PARKED.inc()
