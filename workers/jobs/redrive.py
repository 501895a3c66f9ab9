"""Re-drive: put events whose processing never finished back on the queue, or give up loudly.

An event is stuck when it is still ``received`` or ``failed`` ``REDRIVE_AFTER_SECONDS``
after its row last moved: its message was lost from Redis, or its task ran out of retries
on a transient fault (PostgreSQL down for longer than the retries last), or it crashed on
a bug. While a task still retries an event, every attempt moves ``updated_at``, so an
event in the hands of a worker is not taken (the retry backoff is capped far below the
threshold).

Each stuck event is re-driven at most ``REDRIVE_MAX_ATTEMPTS`` times: a new delivery of
its stored body on the ``deliveries`` queue. Then it is dead-lettered with the reason
(its last error), where a person sees it and can replay it. An event without a stored
body has nothing to re-drive and is dead-lettered at once.

Then the deliveries parked in Redis (``deliveries.parked``: the worker could not even
record them because PostgreSQL was gone) go back to the queue, now that PostgreSQL
answers again. Last, the accepted set is swept (``workers.accepted``): deliveries the
receiver accepted that never reached the inbox -- lost by Celery's transport between its
BRPOP and its bookkeeping -- are pushed again.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import redis
from psycopg_pool import ConnectionPool

from workers import metrics as worker_metrics
from workers.accepted import sweep
from workers.messages import DELIVERY_QUEUE, PARKED_QUEUE, delivery_message

log = logging.getLogger(__name__)

BATCH_SIZE = 200

SELECT_STUCK = """
SELECT event_id, type, payload::text, received_at, redrives, last_error
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

DEAD_LETTER_STUCK = """
WITH dead AS (
    UPDATE events SET status = 'dead', last_error = %(reason)s, updated_at = now()
    WHERE event_id = %(event_id)s AND status IN ('received', 'failed')
    RETURNING event_id, type
)
INSERT INTO dead_letters (event_id, delivery_id, type, reason)
SELECT dead.event_id,
       (SELECT d.delivery_id FROM deliveries d WHERE d.event_id = dead.event_id
        ORDER BY d.recorded_at DESC LIMIT 1),
       dead.type, %(reason)s
FROM dead
"""


@dataclass(frozen=True, slots=True)
class RedriveResult:
    redriven: int = 0
    dead_lettered: int = 0
    unparked: int = 0
    accepted_forgotten: int = 0
    accepted_repushed: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def redrive(
    pool: ConnectionPool,
    client: redis.Redis,
    after_seconds: int,
    max_attempts: int,
    deadline: float,
    batch_size: int = BATCH_SIZE,
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
            client.lpush(DELIVERY_QUEUE, *messages)
            redriven += len(messages)
        if seen < batch_size:
            break
    unparked = unpark(client, limit=10 * batch_size)
    swept = sweep(pool, client, after_seconds, deadline, batch_size)
    result = RedriveResult(
        redriven=redriven,
        dead_lettered=dead,
        unparked=unparked,
        accepted_forgotten=swept.forgotten,
        accepted_repushed=swept.repushed,
    )
    if redriven or dead or unparked or swept.repushed:
        log.warning("redrive.done", extra=result.as_dict())
    return result


def _take_batch(
    pool: ConnectionPool, after_seconds: int, max_attempts: int, batch_size: int
) -> tuple[list[bytes], int, int]:
    """One transaction: lock a batch of stuck events, count a re-drive or dead-letter each."""
    messages: list[bytes] = []
    redriven_ids: list[str] = []
    dead = 0
    with pool.connection() as conn, conn.transaction():
        rows = conn.execute(SELECT_STUCK, {"after": after_seconds, "batch": batch_size}).fetchall()
        for event_id, event_type, payload, received_at, redrives, last_error in rows:
            reason = _give_up_reason(payload, redrives, max_attempts, last_error)
            if reason is not None:
                conn.execute(DEAD_LETTER_STUCK, {"event_id": event_id, "reason": reason})
                worker_metrics.DEAD_LETTERS.labels(event_type or "unknown").inc()
                log.error(
                    "redrive.dead_lettered",
                    extra={"event_id": event_id, "type": event_type, "reason": reason},
                )
                dead += 1
                continue
            messages.append(
                delivery_message(
                    payload,
                    delivery_id=f"redrive-{uuid.uuid4()}",
                    received_at=_iso(received_at),
                )
            )
            redriven_ids.append(event_id)
            log.warning(
                "redrive.event",
                extra={"event_id": event_id, "type": event_type, "redrive": redrives + 1},
            )
        if redriven_ids:
            conn.execute(MARK_REDRIVEN, {"event_ids": redriven_ids})
    return messages, dead, len(rows)


def _give_up_reason(
    payload: str | None, redrives: int, max_attempts: int, last_error: str | None
) -> str | None:
    if payload is None:
        return "not re-drivable: the raw body is not stored"
    if redrives >= max_attempts:
        return (
            f"re-driven {redrives} times without success: "
            f"{last_error or 'no error recorded (the delivery never reached a worker)'}"
        )
    return None


def _iso(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def unpark(client: redis.Redis, limit: int) -> int:
    """Move parked deliveries back to the queue, oldest first, one atomic move each.

    Called once PostgreSQL has answered (the re-drive batches just ran): the database is
    back, so the deliveries it could not take can be tried again. Bounded by ``limit`` so
    one run cannot flood the queue; the rest waits for the next run.
    """
    moved = 0
    while moved < limit:
        # LPUSH parks and kombu consumes from the right: oldest first, order kept.
        if client.lmove(PARKED_QUEUE, DELIVERY_QUEUE, "RIGHT", "LEFT") is None:
            break
        moved += 1
    if moved:
        log.warning("redrive.unparked", extra={"count": moved})
    return moved
