"""The accepted set: a copy in Redis of every delivery answered 202 and not yet recorded.

Why: Celery's Redis transport pops a message off the queue (BRPOP) and only then records
it as unacknowledged. A worker killed with SIGKILL, or a Redis restarted, between the two
steps loses the message, and the receiver had already answered 202, so Voucherify will
not send it again. The fault suite saw it happen (one delivery in a few SIGKILLs).

How: the receiver stores the message in ``ACCEPTED_HASH`` (with its time in
``ACCEPTED_INDEX``) in the same atomic script that queues it (``receiver.enqueue``). The
worker forgets it once the delivery is recorded in PostgreSQL, whatever the outcome
(processed, duplicate, ignored, dead, or failed and left to the re-drive job). The
re-drive job (``sweep``) looks at copies older than ``REDRIVE_AFTER_SECONDS``: a delivery
PostgreSQL has recorded is forgotten (the worker died after its commit); one it has not,
and that is no longer waiting in the queue, is pushed again. A push too many is harmless:
a delivery id already recorded is recorded once, and its event is applied once.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass

import redis
from psycopg_pool import ConnectionPool

from workers.messages import ACCEPTED_HASH, ACCEPTED_INDEX, DELIVERY_QUEUE

log = logging.getLogger(__name__)

RECORDED = "SELECT delivery_id FROM deliveries WHERE delivery_id = ANY(%(ids)s)"


class Forgetter:
    """The worker's side: delete a recorded delivery's copy, one round trip, never raising.

    A failure only leaves the copy for the re-drive job, which forgets it then (the
    delivery is recorded), so it is logged and swallowed.
    """

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self._lock = threading.Lock()
        self._client: redis.Redis | None = None
        self._pid: int | None = None

    def _redis(self) -> redis.Redis:
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                self._client = redis.Redis.from_url(
                    self.redis_url, socket_timeout=2, socket_connect_timeout=2
                )
                self._pid = os.getpid()
            return self._client

    def forget(self, delivery_id: str) -> None:
        try:
            pipe = self._redis().pipeline(transaction=False)
            pipe.hdel(ACCEPTED_HASH, delivery_id)
            pipe.zrem(ACCEPTED_INDEX, delivery_id)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("delivery.forget_failed", extra={"error": repr(exc)})


@dataclass(frozen=True, slots=True)
class SweepResult:
    forgotten: int = 0
    repushed: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def sweep(
    pool: ConnectionPool,
    client: redis.Redis,
    after_seconds: int,
    deadline: float,
    batch_size: int = 200,
) -> SweepResult:
    """Forget copies PostgreSQL has recorded; push again the ones it never got."""
    forgotten = repushed = 0
    now = time.time()
    cutoff = min(now - after_seconds, _oldest_waiting(client))
    while time.monotonic() < deadline:
        members = client.zrangebyscore(
            ACCEPTED_INDEX, "-inf", f"({cutoff}", start=0, num=batch_size
        )
        ids = [m.decode() if isinstance(m, bytes) else str(m) for m in members]
        if not ids:
            break
        with pool.connection() as conn:
            recorded = {row[0] for row in conn.execute(RECORDED, {"ids": ids})}
        missing = [i for i in ids if i not in recorded]
        messages = client.hmget(ACCEPTED_HASH, missing) if missing else []
        pipe = client.pipeline(transaction=True)
        for delivery_id in recorded:
            pipe.hdel(ACCEPTED_HASH, delivery_id)
            pipe.zrem(ACCEPTED_INDEX, delivery_id)
        for delivery_id, message in zip(missing, messages, strict=True):
            if message is None:  # the index outlived its copy: nothing left to push
                pipe.zrem(ACCEPTED_INDEX, delivery_id)
                continue
            # Queued again, and judged again only after another full threshold.
            pipe.lpush(DELIVERY_QUEUE, message)
            pipe.zadd(ACCEPTED_INDEX, {delivery_id: now}, xx=True)
            log.warning("redrive.unrecorded_delivery", extra={"delivery_id": delivery_id})
            repushed += 1
        pipe.execute()  # every id of the batch leaves the range: the next one starts at 0
        forgotten += len(recorded)
        if len(ids) < batch_size:
            break
    result = SweepResult(forgotten=forgotten, repushed=repushed)
    if repushed:
        log.warning("redrive.accepted_swept", extra=result.as_dict())
    return result


def _oldest_waiting(client: redis.Redis) -> float:
    """When the oldest delivery still waiting in the queue was accepted (inf: unknown).

    The queue is FIFO (pushed left, taken right), so an accepted copy older than the
    message at the right end is not waiting in the queue any more: it is in a worker's
    hands (bounded by the visibility timeout), parked, or lost. A copy younger than it
    may simply be waiting behind a backlog, and pushing it again would only double the
    backlog, so the sweep leaves it alone.
    """
    raw = client.lindex(DELIVERY_QUEUE, -1)
    if raw is None:
        return float("inf")
    try:
        delivery_id = json.loads(raw)["headers"]["id"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
    score = client.zscore(ACCEPTED_INDEX, delivery_id)
    return float("inf") if score is None else float(score)
