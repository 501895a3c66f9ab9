"""The entry task the receiver publishes to, and the decision to retry, park or give up.

The entry task has a stable name (``voucherify.process_delivery``); ``register`` (called by
``make_celery``) binds it, by the app's ``WORKER_BATCH_SIZE``, to one of two bodies:

- ``ProcessBatch`` (batch size above 1, the default): the consumer hands it up to
  ``WORKER_BATCH_SIZE`` deliveries at once (``workers.batching``), applied in one
  transaction (``processing.process_batch``), their accepted copies forgotten in one
  Redis pipeline. A delivery the batch could not take (a transient fault of its own, or
  of the whole batch) goes to the single-delivery task (``voucherify.process_delivery.one``)
  with a countdown: the bounded retries below take over from there.
- ``process_delivery`` (batch size 1): one task, one transaction per delivery.

The single-delivery task is always registered (as ``voucherify.process_delivery.one``).
Thin on purpose: bind the log context, run ``process_delivery`` (one transaction), and on
a transient fault retry with exponential backoff and jitter, bounded. Nothing is lost: an
event out of retries is left ``failed`` in the inbox for the re-drive job, and when even
that cannot be written (PostgreSQL down all along) the message is parked in Redis, where
the re-drive job picks it up again. Each task reads the settings from its app
(``workers.app_settings.settings_of``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from typing import Any

from celery import Celery, Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from psycopg_pool import ConnectionPool

from config import logs
from config.settings import Settings
from schemas.vocabulary import DeliveryOutcome
from workers import metrics, processing, queue
from workers.app_settings import settings_of
from workers.batching import BatchTask, Item
from workers.db import settings_pool
from workers.delivery import contention_keys
from workers.faults import TransientError, where

log = logging.getLogger(__name__)


def backoff_seconds(retries: int, cap: int) -> float:
    """Exponential (1, 2, 4, ... s) capped at ``cap``, with full jitter on the upper half."""
    ceiling = min(float(cap), 2.0**retries)
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not crypto


SINGLE_DELIVERY_TASK = queue.PROCESS_DELIVERY_TASK + ".one"
"""The single-delivery task a batch hands the deliveries it could not take to."""


def register(app: Celery, settings: Settings) -> None:
    """Bind the entry task's name to the batch task or, batch size 1, the single one."""
    if settings.worker_batch_size > 1:
        app.task(
            name=queue.PROCESS_DELIVERY_TASK,
            base=ProcessBatch,
            bind=True,
            flush_every=settings.worker_batch_size,
            flush_interval=settings.worker_batch_flush_ms / 1000,
            shared=False,
        )(_not_called)
    else:
        app.task(name=queue.PROCESS_DELIVERY_TASK, bind=True, shared=False)(process_one)


def _not_called(task: Task, **_: str) -> None:
    raise NotImplementedError("the batch task runs through ProcessBatch.run_batch")


def process_one(task: Task, body: str, delivery_id: str, received_at: str) -> str:
    """One delivery, one transaction; a transient fault retries this task, bounded."""
    settings = settings_of(task.app)
    message = queue.Message(body, delivery_id, received_at)
    retries = int(task.request.retries or 0)
    with logs.bind(delivery_id=delivery_id, attempt=retries + 1):
        started = time.perf_counter()
        pool = settings_pool(settings)
        [start] = queue.count_starts(
            queue.process_client(settings.redis_url, timeout=2), [delivery_id]
        )
        if start > queue.MAX_STARTS:
            return dead_letter_poison(settings, pool, message, start - 1)
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


process_delivery = shared_task(name=SINGLE_DELIVERY_TASK, bind=True)(process_one)


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
    log.error("delivery.crashed", extra={"error": error, "where": where(exc)})
    if not record_failure(settings, pool, message, error):
        park(settings, message)
    metrics.EVENTS.labels("other", DeliveryOutcome.FAILED).inc()
    return DeliveryOutcome.FAILED


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


class ProcessBatch(BatchTask):
    """The entry task with batching on: ``run_batch`` runs in a pool process."""

    abstract = True

    def keys_of(self, kwargs: dict[str, Any]) -> frozenset[str]:
        body = kwargs.get("body")
        return contention_keys(body) if isinstance(body, str) else frozenset()

    def run_batch(self, items: Sequence[Item]) -> list[str]:
        """Apply a batch; the delivery ids not finished (the consumer gives them back).

        Every delivery ends applied or recorded (forgotten in Redis at once), handed to
        the single-delivery task, or -- when not even that could be published -- given
        back to the broker unacknowledged. Never raises for one delivery's sake.
        """
        settings = settings_of(self.app)
        started = time.perf_counter()
        pool = settings_pool(settings)
        messages = [
            (queue.Message(kw["body"], kw["delivery_id"], kw["received_at"]), retries)
            for _, kw, retries in items
        ]
        messages, alone, unfinished = self.isolate(settings, pool, messages)
        if alone:  # a previous start of theirs never finished: each applied on its own
            unfinished += hand_over(self, settings, alone, isolate=True)
        if not messages:
            return unfinished
        try:
            results = processing.process_batch(
                pool, [(m.body, m.delivery_id, m.received_at) for m, _ in messages]
            )
        except (TransientError, SoftTimeLimitExceeded) as exc:
            pool.check()  # drop connections a restarted PostgreSQL left broken
            log.warning("batch.transient", extra={"error": str(exc), "size": len(items)})
            return unfinished + hand_over(self, settings, messages)
        elapsed = time.perf_counter() - started
        done: list[str] = []
        deferred: list[tuple[queue.Message, int]] = []
        for (message, retries), result in zip(messages, results, strict=True):
            if isinstance(result, processing.Deferred):
                if result.transient or isinstance(result.error, SoftTimeLimitExceeded):
                    deferred.append((message, retries))
                elif isinstance(result.error, Exception):
                    give_up_on_crash(settings, pool, message, result.error)
                continue
            done.append(message.delivery_id)
            metrics.observe_outcome(result, message.received_at, elapsed / len(messages))
            with logs.bind(delivery_id=message.delivery_id, attempt=retries + 1):
                log.info(
                    "event." + result.status,
                    extra={
                        "event_id": result.event_id,
                        "type": result.type,
                        "reason": result.reason,
                        "ms": round(elapsed * 1000, 2),
                        "batch": len(messages),
                    },
                )
        # Recorded in PostgreSQL: the copies have done their job (one round trip).
        queue.forget(queue.process_client(settings.redis_url, timeout=2), done)
        return unfinished + (hand_over(self, settings, deferred) if deferred else [])

    def isolate(
        self,
        settings: Settings,
        pool: ConnectionPool,
        messages: list[tuple[queue.Message, int]],
    ) -> tuple[list[tuple[queue.Message, int]], list[tuple[queue.Message, int]], list[str]]:
        """Count a start of each delivery (``queue.count_starts``, one round trip): those
        a previous start of which never finished (its pool process died: a SIGKILL, the
        OOM killer, a payload that kills it) go alone, so that one such payload cannot
        take 99 others down with it again; one that died ``MAX_STARTS`` - 1 times is
        dead-lettered. The batch, the ones to apply alone, and the ids left unfinished."""
        client = queue.process_client(settings.redis_url, timeout=2)
        starts = queue.count_starts(client, [m.delivery_id for m, _ in messages])
        batch: list[tuple[queue.Message, int]] = []
        alone: list[tuple[queue.Message, int]] = []
        unfinished: list[str] = []
        for entry, start in zip(messages, starts, strict=True):
            if start > queue.MAX_STARTS:
                if dead_letter_poison(settings, pool, entry[0], start - 1) != "dead":
                    unfinished.append(entry[0].delivery_id)
            elif start > 1 and len(messages) > 1:
                alone.append(entry)
            else:
                batch.append(entry)
        return batch, alone, unfinished


def dead_letter_poison(
    settings: Settings, pool: ConnectionPool, message: queue.Message, deaths: int
) -> str:
    """A delivery started ``deaths`` times without finishing (its pool process died on
    it, or it was handed on once): a dead letter, body
    kept, replayable once the code can take it; never started again. "retry" when
    PostgreSQL could not take the dead letter now (the delivery is given back)."""
    reason = f"started {deaths} times without finishing: its worker process died on it"
    try:
        outcome = processing.record_dead_letter(
            pool, message.body, message.delivery_id, message.received_at, reason
        )
    except TransientError:
        return "retry"
    forget(settings, message)
    if outcome.status == DeliveryOutcome.DEAD:
        metrics.DEAD_LETTERS.labels(metrics.type_label(outcome.type)).inc()
    log.error(
        "delivery.poison",
        extra={"delivery_id": message.delivery_id, "event_id": outcome.event_id, "reason": reason},
    )
    return "dead"


def hand_over(
    task: Task,
    settings: Settings,
    messages: Sequence[tuple[queue.Message, int]],
    *,
    isolate: bool = False,
) -> list[str]:
    """Give deliveries the batch could not take to the single-delivery task, after a
    backoff with jitter (the batch was their attempt ``retries + 1``), or at once when
    they are only to be applied alone (``isolate``); the ids that could not even be
    published (Redis gone): the consumer gives those back to the broker."""
    unfinished: list[str] = []
    for message, retries in messages:
        attempt = retries + 1
        metrics.RETRIES.inc()
        countdown = 0.0 if isolate else backoff_seconds(retries, settings.retry_backoff_max_seconds)
        try:
            task.app.send_task(
                SINGLE_DELIVERY_TASK,
                kwargs=message.kwargs(),
                task_id=message.delivery_id,
                countdown=countdown,
                retries=attempt,
                queue=queue.DELIVERY_QUEUE,
                kwargsrepr=queue.safe_kwargsrepr(message.delivery_id),
            )
        except Exception as exc:  # noqa: BLE001 - kept unacknowledged instead
            log.warning(
                "delivery.hand_over_failed",
                extra={"delivery_id": message.delivery_id, "error": type(exc).__name__},
            )
            unfinished.append(message.delivery_id)
        else:
            log.warning(
                "delivery.handed_over",
                extra={"delivery_id": message.delivery_id, "countdown": round(countdown, 2)},
            )
    return unfinished
