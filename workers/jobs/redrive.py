"""Re-drive: put events whose processing never finished back on the queue, or give up loudly.

An event still ``received`` or ``failed`` ``REDRIVE_AFTER_SECONDS`` after its row last
moved is stuck (its message lost, its retries spent on a long outage, or a crash on a
bug; a worker moves the row at every attempt, so an event still being retried is left
alone): it gets a new delivery of its stored body, at most ``max_attempts`` times, then a
dead letter with its last error (at once when no body is stored). Then the parked
deliveries go back to the queue, and the accepted set is swept (``workers.queue.sweep``):
a delivery lost in flight is pushed again once ``ACCEPTED_GRACE_SECONDS`` old, and one
lost ``queue.MAX_PUSHES`` times is recorded ``failed`` here (``fail_in``), its body kept,
a stuck event like any other from then on. A waiting delivery is never touched, however
long the backlog. Details: docs/reconciliation.md, "Re-drive".
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from psycopg.rows import class_row, dict_row
from psycopg_pool import ConnectionPool

from compat.kombu_redis import held_task_ids
from schemas.vocabulary import UNFINISHED_STATUSES, EventStatus
from workers import metrics as worker_metrics
from workers import processing, queue
from workers.jobs.result import JobResult

log = logging.getLogger(__name__)

BATCH_SIZE = 200
ACCEPTED_GRACE_SECONDS = 30
"""Age of an accepted copy before the sweep asks where its delivery is (at most half the
visibility timeout: ``accepted_grace``). Only a delivery lost in flight is pushed again,
so this covers only the instant between kombu's BRPOP and its bookkeeping (and clocks
between hosts), not a backlog: a delivery lost by a SIGKILL or a failover comes back
within this plus the job's interval, sooner than kombu restores what a dead worker held."""


def accepted_grace(visibility_timeout_seconds: float) -> float:
    return min(ACCEPTED_GRACE_SECONDS, visibility_timeout_seconds / 2)


# The statuses are written out, not parameters: they are the predicate of the partial
# index events_unfinished (migrations/0001_inbox.sql), and the planner matches a partial
# index against constants only -- a prepared statement's generic plan would ignore it.
SELECT_STUCK = """
SELECT event_id, type, coalesce(payload::text, raw_body) AS payload, received_at, redrives,
       last_error
FROM events
WHERE status IN ('received', 'failed')
  AND updated_at < now() - make_interval(secs => %(after)s)
ORDER BY updated_at
LIMIT %(batch)s
FOR UPDATE SKIP LOCKED
"""

MARK_REDRIVEN = """
UPDATE events SET redrives = redrives + 1, updated_at = now()
WHERE event_id = ANY(%(event_ids)s)
"""

RECORDED = "SELECT delivery_id FROM deliveries WHERE delivery_id = ANY(%(ids)s)"

DEAD_LETTER_STUCK = """
WITH dead AS (
    UPDATE events SET status = %(dead)s, last_error = %(reason)s, updated_at = now()
    WHERE event_id = %(event_id)s AND status = ANY(%(unfinished)s)
    RETURNING event_id, type
)
INSERT INTO dead_letters (event_id, delivery_id, type, reason)
SELECT dead.event_id,
       (SELECT d.delivery_id FROM deliveries d WHERE d.event_id = dead.event_id
        ORDER BY d.recorded_at DESC LIMIT 1),
       dead.type, %(reason)s
FROM dead
"""
DEAD_LETTER_WORDS = {"dead": EventStatus.DEAD, "unfinished": list(UNFINISHED_STATUSES)}


@dataclass(frozen=True, slots=True)
class StuckEvent:
    """A row of ``SELECT_STUCK``."""

    event_id: str
    type: str
    payload: str | None
    received_at: datetime
    redrives: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class RedriveResult(JobResult):
    redriven: int = 0
    dead_lettered: int = 0
    unparked: int = 0
    accepted_forgotten: int = 0
    accepted_repushed: int = 0
    accepted_given_up: int = 0


def redrive(
    pool: ConnectionPool,
    client: redis.Redis,
    after_seconds: int,
    max_attempts: int,
    deadline: float,
    batch_size: int = BATCH_SIZE,
    grace_seconds: float = ACCEPTED_GRACE_SECONDS,
) -> RedriveResult:
    redriven = dead = 0
    while time.monotonic() < deadline:
        messages, dead_now, seen = _take_batch(pool, after_seconds, max_attempts, batch_size)
        dead += dead_now
        if messages:
            # Pushed only after the transaction committed: a worker that picked a message up
            # before the commit would wait on our row lock anyway, and a push that fails now
            # loses nothing -- the event is still unfinished in the inbox and comes back in
            # a later run (one of its attempts spent). The opposite order could push a
            # message for an attempt the database never counted.
            queue.requeue(client, messages)
            redriven += len(messages)
        if seen < batch_size:
            break
    unparked = queue.unpark(client, limit=10 * batch_size)
    swept = queue.sweep(
        client,
        recorded_in(pool),
        grace_seconds,
        deadline,
        batch_size,
        held=held_task_ids,
        give_up=fail_in(pool),
    )
    result = RedriveResult(
        redriven=redriven,
        dead_lettered=dead,
        unparked=unparked,
        accepted_forgotten=swept.forgotten,
        accepted_repushed=swept.repushed,
        accepted_given_up=swept.given_up,
    )
    if redriven or dead or unparked or swept.repushed or swept.given_up:
        log.warning("redrive.done", extra=result.as_dict())
    return result


def recorded_in(pool: ConnectionPool) -> queue.Recorded:
    """The sweep's question to the inbox: which of these deliveries are recorded?"""

    def recorded(ids: Sequence[str]) -> set[str]:
        with pool.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            return {row["delivery_id"] for row in cursor.execute(RECORDED, {"ids": list(ids)})}

    return recorded


def fail_in(pool: ConnectionPool) -> queue.GiveUp:
    """The sweep's last word on deliveries lost ``MAX_PUSHES`` times: their events recorded
    ``failed`` in the inbox with the reason, bodies kept, for the re-drive of stuck events
    (never a final status: a later delivery of the event still applies it; an event final
    already only gains a duplicate delivery row). A delivery PostgreSQL could not take now
    is not given up: its copy waits for a later run."""

    def give_up(unrecorded: Sequence[queue.Unrecorded]) -> set[str]:
        recorded: set[str] = set()
        for delivery in unrecorded:
            reason = f"lost {delivery.pushes} times in the queue (accepted-set sweep)"
            message = delivery.message
            if not processing.record_failure(
                pool,
                message.body if message else "",
                delivery.delivery_id,
                message.received_at if message else "",
                reason,
            ):
                continue
            recorded.add(delivery.delivery_id)
            log.error(
                "redrive.accepted_given_up",
                extra={"delivery_id": delivery.delivery_id, "reason": reason},
            )
        return recorded

    return give_up


def _take_batch(
    pool: ConnectionPool, after_seconds: int, max_attempts: int, batch_size: int
) -> tuple[list[queue.Message], int, int]:
    """One transaction: lock a batch of stuck events, count a re-drive or dead-letter each."""
    messages: list[queue.Message] = []
    redriven_ids: list[str] = []
    dead = 0
    with pool.connection() as conn, conn.transaction():
        cursor = conn.cursor(row_factory=class_row(StuckEvent))
        rows = cursor.execute(
            SELECT_STUCK, {"after": after_seconds, "batch": batch_size}
        ).fetchall()
        for event in rows:
            reason = _give_up_reason(event, max_attempts)
            if reason is not None:
                conn.execute(
                    DEAD_LETTER_STUCK,
                    {**DEAD_LETTER_WORDS, "event_id": event.event_id, "reason": reason},
                )
                worker_metrics.DEAD_LETTERS.labels(worker_metrics.type_label(event.type)).inc()
                log.error(
                    "redrive.dead_lettered",
                    extra={"event_id": event.event_id, "type": event.type, "reason": reason},
                )
                dead += 1
                continue
            assert event.payload is not None  # _give_up_reason gives up on a missing body
            received_at = _iso(event.received_at)
            messages.append(queue.Message(event.payload, f"redrive-{uuid.uuid4()}", received_at))
            redriven_ids.append(event.event_id)
            log.warning(
                "redrive.event",
                extra={
                    "event_id": event.event_id,
                    "type": event.type,
                    "redrive": event.redrives + 1,
                },
            )
        if redriven_ids:
            conn.execute(MARK_REDRIVEN, {"event_ids": redriven_ids})
    return messages, dead, len(rows)


def _give_up_reason(event: StuckEvent, max_attempts: int) -> str | None:
    if event.payload is None:
        return "not re-drivable: the raw body is not stored"
    if event.redrives >= max_attempts:
        return (
            f"re-driven {event.redrives} times without success: "
            f"{event.last_error or 'no error recorded (the delivery never reached a worker)'}"
        )
    return None


def _iso(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)
