"""The accepted set: forget a recorded delivery's copy; sweep the copies left behind.

The worker forgets a copy once the delivery is recorded in PostgreSQL, whatever the
outcome (processed, duplicate, ignored, dead, or failed and left to the re-drive job).
The sweep (run by the re-drive job) looks at copies older than a threshold: a delivery
PostgreSQL has recorded is forgotten (the worker died after its commit); one it has not,
and that is no longer waiting in the queue, is pushed again. A push too many is
harmless: a delivery id already recorded is recorded once, its event applied once.

Pushing again is bounded: the sweep counts its pushes of each copy
(``deliveries.accepted.pushes``), and a copy pushed ``MAX_PUSHES`` times that still never
reached the inbox -- a delivery every worker that takes it fails to record, or one the
transport keeps losing -- is not pushed again but handed to the caller's ``GiveUp``
(the re-drive job dead-letters it, body kept), then forgotten. Nothing loops.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass

import redis

from workers.queue.keys import ACCEPTED_HASH, ACCEPTED_INDEX, ACCEPTED_PUSHES, DELIVERY_QUEUE
from workers.queue.message import Message, task_id_of

log = logging.getLogger(__name__)

MAX_PUSHES = 3
"""Pushes of one accepted copy by the sweep before it gives up on the delivery."""

Recorded = Callable[[Sequence[str]], Collection[str]]
"""Which of these delivery ids PostgreSQL has recorded (the caller asks the inbox)."""


@dataclass(frozen=True, slots=True)
class Unrecorded:
    """An accepted delivery the sweep gives up on: pushed ``pushes`` times, never recorded."""

    delivery_id: str
    pushes: int
    message: Message | None
    """The accepted copy, read back; None when it cannot be read."""


GiveUp = Callable[[Sequence[Unrecorded]], Collection[str]]
"""Record these deliveries for good (the caller dead-letters them in the inbox); the ids it
recorded. Their copies are forgotten; the others are kept, and offered again later."""


def forget(client: redis.Redis, delivery_ids: Sequence[str]) -> None:
    """Delete recorded deliveries' copies in one round trip; never raises.

    A failure only leaves the copies for the sweep, which forgets them then (they are
    recorded), so it is logged and swallowed.
    """
    if not delivery_ids:
        return
    try:
        pipe = client.pipeline(transaction=False)
        pipe.hdel(ACCEPTED_HASH, *delivery_ids)
        pipe.zrem(ACCEPTED_INDEX, *delivery_ids)
        pipe.hdel(ACCEPTED_PUSHES, *delivery_ids)
        pipe.execute()
    except redis.RedisError as exc:
        log.warning("delivery.forget_failed", extra={"error": f"{type(exc).__name__}: {exc}"})


@dataclass(frozen=True, slots=True)
class SweepResult:
    forgotten: int = 0
    repushed: int = 0
    given_up: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def sweep(
    client: redis.Redis,
    recorded: Recorded,
    after_seconds: int,
    deadline: float,
    batch_size: int = 200,
    *,
    give_up: GiveUp | None = None,
) -> SweepResult:
    """Forget copies PostgreSQL has recorded; push again the ones it never got, each at most
    ``MAX_PUSHES`` times, then hand them to ``give_up``. Without ``give_up`` a copy out of
    pushes is kept, not pushed (``depths`` shows it)."""
    total = Counter[str]()
    now = time.time()
    cutoff = min(now - after_seconds, _oldest_waiting(client))
    while time.monotonic() < deadline:
        members = client.zrangebyscore(
            ACCEPTED_INDEX, "-inf", f"({cutoff}", start=0, num=batch_size
        )
        ids = [m.decode() if isinstance(m, bytes) else str(m) for m in members]
        if not ids:
            break
        total.update(_sweep_batch(client, ids, recorded, give_up, now))
        if len(ids) < batch_size:
            break
    result = SweepResult(**total)
    if result.repushed or result.given_up:
        log.warning("redrive.accepted_swept", extra=result.as_dict())
    return result


def _sweep_batch(
    client: redis.Redis,
    ids: list[str],
    recorded: Recorded,
    give_up: GiveUp | None,
    now: float,
) -> Counter[str]:
    """One batch of old copies, in one Redis transaction; every id leaves the swept range."""
    counts = Counter[str]()
    done = set(recorded(ids))
    missing = [i for i in ids if i not in done]
    messages = client.hmget(ACCEPTED_HASH, missing) if missing else []
    pushes = client.hmget(ACCEPTED_PUSHES, missing) if missing else []
    pipe = client.pipeline(transaction=True)
    for delivery_id in done:
        _drop(pipe, delivery_id)
    counts["forgotten"] = len(done)
    exhausted: list[Unrecorded] = []
    for delivery_id, message, count in zip(missing, messages, pushes, strict=True):
        pushed = int(count or 0)
        if message is None:  # the index outlived its copy: nothing left to push
            _drop(pipe, delivery_id)
        elif pushed >= MAX_PUSHES:
            exhausted.append(Unrecorded(delivery_id, pushed, Message.decode(message)))
        else:
            # Queued again, and judged again only after another full threshold.
            pipe.lpush(DELIVERY_QUEUE, message)
            pipe.zadd(ACCEPTED_INDEX, {delivery_id: now}, xx=True)
            pipe.hincrby(ACCEPTED_PUSHES, delivery_id, 1)
            log.warning(
                "redrive.unrecorded_delivery",
                extra={"delivery_id": delivery_id, "push": pushed + 1},
            )
            counts["repushed"] += 1
    given = set(give_up(exhausted)) if exhausted and give_up is not None else set()
    for unrecorded in exhausted:
        if unrecorded.delivery_id in given:
            _drop(pipe, unrecorded.delivery_id)
            counts["given_up"] += 1
            continue
        # Not recorded by the caller (or no caller to record it): kept, not pushed,
        # offered again after another full threshold.
        pipe.zadd(ACCEPTED_INDEX, {unrecorded.delivery_id: now}, xx=True)
        log.error(
            "redrive.unrecorded_delivery_kept",
            extra={"delivery_id": unrecorded.delivery_id, "pushes": unrecorded.pushes},
        )
    pipe.execute()
    return counts


def _drop(pipe: redis.client.Pipeline, delivery_id: str) -> None:
    """Forget one copy, its index entry and its push count (in the sweep's transaction)."""
    pipe.hdel(ACCEPTED_HASH, delivery_id)
    pipe.zrem(ACCEPTED_INDEX, delivery_id)
    pipe.hdel(ACCEPTED_PUSHES, delivery_id)


def _oldest_waiting(client: redis.Redis) -> float:
    """When the oldest delivery still waiting in the queue was accepted (inf: unknown).

    The queue is FIFO (pushed left, taken right), so an accepted copy older than the
    message at the right end is not waiting in the queue any more: it is in a worker's
    hands (bounded by the visibility timeout), parked, or lost. A copy younger than it
    may simply be waiting behind a backlog, and pushing it again would only double the
    backlog, so the sweep leaves it alone.
    """
    raw = client.lindex(DELIVERY_QUEUE, -1)
    delivery_id = task_id_of(raw) if raw is not None else None
    if delivery_id is None:
        return float("inf")
    score = client.zscore(ACCEPTED_INDEX, delivery_id)
    return float("inf") if score is None else float(score)
