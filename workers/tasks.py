"""The entry task the receiver publishes to, and the decision to retry, park or give up.

Thin on purpose: bind the log context, run ``process_delivery`` (one transaction), and on
a transient fault retry with exponential backoff and jitter, bounded. Nothing is lost:
an event out of retries is left ``failed`` in the inbox for the re-drive job, and when
even that cannot be written (PostgreSQL down all along) the message is parked in Redis,
where the re-drive job picks it up again.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import redis
from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded

from config import logs
from config.settings import Settings
from workers import metrics, processing
from workers.accepted import Forgetter
from workers.db import get_pool
from workers.messages import (
    PARKED_QUEUE,
    PROCESS_DELIVERY_TASK,
    delivery_message,
    safe_kwargsrepr,
)

log = logging.getLogger(__name__)


def backoff_seconds(retries: int, cap: int) -> float:
    """Exponential (1, 2, 4, ... s) capped at ``cap``, with full jitter on the upper half."""
    ceiling = min(float(cap), 2.0**retries)
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not crypto


def register(app: Celery, settings: Settings) -> None:
    assert settings.database_url is not None
    assert settings.redis_url is not None
    database_url, redis_url = settings.database_url, settings.redis_url
    max_retries = settings.event_max_retries
    forgetter = Forgetter(redis_url)

    def record_failure(
        pool: Any, body: str, delivery_id: str, received_at: str, error: str
    ) -> bool:
        """Mark the event failed in the inbox; once there, its accepted copy is not needed
        (the re-drive job takes over). False when even that could not be written."""
        recorded = processing.record_failure(pool, body, delivery_id, received_at, error)
        if recorded:
            forgetter.forget(delivery_id)
        return recorded

    @app.task(name=PROCESS_DELIVERY_TASK, bind=True, max_retries=max_retries)
    def process_delivery(task: Task, body: str, delivery_id: str, received_at: str) -> str:
        retries = int(task.request.retries or 0)
        with logs.bind(delivery_id=delivery_id, attempt=retries + 1):
            started = time.perf_counter()
            pool = get_pool(database_url, settings.db_pool_max_size)
            try:
                outcome = processing.process_delivery(pool, body, delivery_id, received_at)
            except (processing.TransientError, SoftTimeLimitExceeded) as exc:
                return _transient(task, pool, body, delivery_id, received_at, exc, retries)
            except Exception as exc:  # a bug: keep the event, let the re-drive job try later
                log.exception("delivery.crashed")
                error = f"{type(exc).__name__}: {exc}"
                if not record_failure(pool, body, delivery_id, received_at, error):
                    park(redis_url, body, delivery_id, received_at)
                metrics.EVENTS.labels("unknown", "failed").inc()
                return "failed"
            forgetter.forget(delivery_id)  # recorded in PostgreSQL: the copy has done its job
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

    def _transient(
        task: Task,
        pool: Any,
        body: str,
        delivery_id: str,
        received_at: str,
        exc: BaseException,
        retries: int,
    ) -> str:
        error = f"{type(exc).__name__}: {exc}"
        pool.check()  # drop connections a restarted PostgreSQL left broken
        recorded = record_failure(pool, body, delivery_id, received_at, error)
        metrics.RETRIES.inc()
        if retries >= max_retries:
            log.error("delivery.out_of_retries", extra={"error": error, "recorded": recorded})
            if not recorded:
                park(redis_url, body, delivery_id, received_at)
            return "failed"
        countdown = backoff_seconds(retries, settings.retry_backoff_max_seconds)
        log.warning("delivery.retry", extra={"error": error, "countdown": round(countdown, 2)})
        raise task.retry(
            countdown=countdown,
            max_retries=max_retries,
            kwargsrepr=safe_kwargsrepr(delivery_id),
        )


def park(redis_url: str, body: str, delivery_id: str, received_at: str) -> None:
    """Keep a delivery the database could not take, in a Redis list nobody consumes.

    The re-drive job moves parked deliveries back to the queue once PostgreSQL answers.
    If Redis is gone too, raising makes Celery keep the message (late ack): not lost.
    """
    client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        client.lpush(PARKED_QUEUE, delivery_message(body, delivery_id, received_at))
    finally:
        client.close()
    metrics.PARKED.inc()
    log.error("delivery.parked", extra={"delivery_id": delivery_id})
