"""The accepted set: forget a recorded delivery's copy; sweep the copies left behind.

The worker forgets a copy once the delivery is recorded in PostgreSQL, whatever the
outcome, and counts the unfinished starts of a delivery here (``count_starts``, cleared
by ``forget``). The sweep (run by the re-drive job) asks of each copy older than a short
grace where its delivery is, never what the head of the queue says: recorded, it is
forgotten; waiting in one of the queue's lists or held by a worker (kombu's
unacknowledged hash), it is left alone, however long a backlog keeps it; neither, it was
lost in flight (kombu takes a message off the list with BRPOP before it records it) and
is pushed again, at most ``MAX_PUSHES`` times, then handed to the caller's ``GiveUp``.
A push too many is harmless: the inbox records a delivery once. Details:
docs/reconciliation.md, "Re-drive", and docs/guarantees.md.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass

import redis

from workers.queue.keys import (
    ACCEPTED_HASH,
    ACCEPTED_INDEX,
    ACCEPTED_PUSHES,
    DELIVERY_QUEUE,
    PARKED_QUEUE,
    STARTS,
)
from workers.queue.message import Message, task_id_of

log = logging.getLogger(__name__)

MAX_PUSHES = 3
"""Pushes of one accepted copy by the sweep before it gives up on the delivery."""

Recorded = Callable[[Sequence[str]], Collection[str]]
"""Which of these delivery ids PostgreSQL has recorded (the caller asks the inbox)."""

Held = Callable[[redis.Redis], Collection[str]]
"""The task ids the broker's transport holds as taken by a worker and not acknowledged
(the worker passes ``compat.kombu_redis.held_task_ids``: kombu's format stays there)."""


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
        pipe.hdel(STARTS, *delivery_ids)
        pipe.execute()
    except redis.RedisError as exc:
        log.warning("delivery.forget_failed", extra={"error": f"{type(exc).__name__}: {exc}"})


MAX_STARTS = 4
"""Starts of one delivery, never finished, after which the worker dead-letters it instead
of starting it again: its pool process died on it three times (a payload that kills the
process, say), and at every start after the first it was applied alone."""


def count_starts(client: redis.Redis, delivery_ids: Sequence[str]) -> list[int]:
    """Count one more start of each delivery (``forget`` clears the count once it is
    recorded); each one's number, 1 for a first start. Never raises: when Redis cannot
    say, every start counts as a first (the count only isolates and stops a poison)."""
    if not delivery_ids:
        return []
    try:
        pipe = client.pipeline(transaction=False)
        for delivery_id in delivery_ids:
            pipe.hincrby(STARTS, delivery_id, 1)
        return [int(n) for n in pipe.execute()]
    except redis.RedisError as exc:
        log.warning("delivery.starts_not_counted", extra={"error": type(exc).__name__})
        return [1] * len(delivery_ids)


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
    after_seconds: float,
    deadline: float,
    batch_size: int = 200,
    *,
    held: Held,
    give_up: GiveUp | None = None,
) -> SweepResult:
    """Forget copies PostgreSQL has recorded; push again the ones lost in flight (neither
    waiting in a list nor held by a worker), each at most ``MAX_PUSHES`` times, then hand
    them to ``give_up``. Without ``give_up`` a copy out of pushes is kept, not pushed
    (``depths`` shows it). Only copies older than ``after_seconds`` are looked at."""
    total = Counter[str]()
    now = time.time()
    cutoff = now - after_seconds
    waiting = Waiting(client)
    offset = 0  # copies left in place keep their score: page past them
    while time.monotonic() < deadline:
        members = client.zrangebyscore(
            ACCEPTED_INDEX, "-inf", f"({cutoff}", start=offset, num=batch_size
        )
        ids = [m.decode() if isinstance(m, bytes) else str(m) for m in members]
        if not ids:
            break
        counts = _sweep_batch(client, ids, recorded, held, give_up, now, waiting, deadline)
        offset += counts.pop("left", 0)
        total.update(counts)
        if len(ids) < batch_size:
            break
    result = SweepResult(**total)
    if result.repushed or result.given_up:
        log.warning("redrive.accepted_swept", extra=result.as_dict())
    return result


class Waiting:
    """Which deliveries wait in the queue's lists, read lazily: from the left (newest
    first), a chunk at a time, only as far as a question needs, once per sweep.

    Reading from the left, a concurrent push (always at the left) shifts the rest by one,
    so an element may be read twice but none still waiting is missed; one taken from the
    right before the reading reached it is in kombu's hash by then (read afterwards)."""

    LISTS = (DELIVERY_QUEUE, PARKED_QUEUE)

    def __init__(self, client: redis.Redis, chunk: int = 1000) -> None:
        self._client = client
        self._chunk = chunk
        self._found: set[str] = set()
        self._lists = list(self.LISTS)
        self._position = 0

    def among(self, ids: Collection[str]) -> set[str]:
        """Those of ``ids`` waiting in a list (read on until all are found or none is left)."""
        wanted = set(ids) - self._found
        while wanted and self._lists:
            raws = self._client.lrange(
                self._lists[0], self._position, self._position + self._chunk - 1
            )
            if len(raws) < self._chunk:
                self._lists.pop(0)
                self._position = 0
            else:
                self._position += len(raws)
            for raw in raws:
                delivery_id = task_id_in(raw)
                if delivery_id is not None:
                    self._found.add(delivery_id)
                    wanted.discard(delivery_id)
        return {i for i in ids if i in self._found}

    @property
    def complete(self) -> bool:
        """Whether every list was read to its end."""
        return not self._lists


_TASK_ID = re.compile(rb'"id":\s*"([^"\\]+)"')
"""The first ``"id"`` key of a message: its headers' task id (the body before it is
base64; ``Message.encode``, kombu's restore and Celery's ``send_task`` all write it so)."""


def task_id_in(raw: bytes | str) -> str | None:
    """A stored message's task id, by a search on its bytes (a backlog is read whole)."""
    data = raw.encode() if isinstance(raw, str) else raw
    match = _TASK_ID.search(data)
    if match is not None:
        return match.group(1).decode(errors="replace")
    return task_id_of(raw)


def _sweep_batch(
    client: redis.Redis,
    ids: list[str],
    recorded: Recorded,
    held: Held,
    give_up: GiveUp | None,
    now: float,
    waiting: Waiting,
    deadline: float,
) -> Counter[str]:
    """One batch of old copies, in one Redis transaction. ``left``: how many stay in place
    (waiting or held): the caller pages past them."""
    counts = Counter[str]()
    done = set(recorded(ids))
    unrecorded = [i for i in ids if i not in done]
    alive: set[str] = set()
    if unrecorded:
        alive = waiting.among(unrecorded)
        if not waiting.complete and time.monotonic() >= deadline:
            alive.update(unrecorded)  # not read to the end in time: assume waiting
        # Read after the lists: a message taken while they were read is held by now.
        alive |= set(held(client)) & set(unrecorded)
        lost = [i for i in unrecorded if i not in alive]
        # Recorded meanwhile (a worker's commit since the first question): forgotten.
        late = set(recorded(lost)) if lost else set()
        done |= late
        unrecorded = [i for i in lost if i not in late]
    counts["left"] = len(alive)
    messages = client.hmget(ACCEPTED_HASH, unrecorded) if unrecorded else []
    pushes = client.hmget(ACCEPTED_PUSHES, unrecorded) if unrecorded else []
    pipe = client.pipeline(transaction=True)
    for delivery_id in done:
        _drop(pipe, delivery_id)
    counts["forgotten"] = len(done)
    exhausted: list[Unrecorded] = []
    for delivery_id, message, count in zip(unrecorded, messages, pushes, strict=True):
        pushed = int(count or 0)
        if message is None:  # the index outlived its copy: nothing left to push
            _drop(pipe, delivery_id)
        elif pushed >= MAX_PUSHES:
            exhausted.append(Unrecorded(delivery_id, pushed, Message.decode(message)))
        else:
            # Queued again (waiting, so left alone until it is lost again).
            pipe.lpush(DELIVERY_QUEUE, message)
            pipe.zadd(ACCEPTED_INDEX, {delivery_id: now}, xx=True)
            pipe.hincrby(ACCEPTED_PUSHES, delivery_id, 1)
            log.warning(
                "redrive.unrecorded_delivery",
                extra={"delivery_id": delivery_id, "push": pushed + 1},
            )
            counts["repushed"] += 1
    given = set(give_up(exhausted)) if exhausted and give_up is not None else set()
    for unrecorded_copy in exhausted:
        if unrecorded_copy.delivery_id in given:
            _drop(pipe, unrecorded_copy.delivery_id)
            counts["given_up"] += 1
            continue
        # Not recorded by the caller (or no caller to record it): kept, not pushed,
        # offered again after another grace.
        pipe.zadd(ACCEPTED_INDEX, {unrecorded_copy.delivery_id: now}, xx=True)
        log.error(
            "redrive.unrecorded_delivery_kept",
            extra={"delivery_id": unrecorded_copy.delivery_id, "pushes": unrecorded_copy.pushes},
        )
    pipe.execute()
    return counts


def _drop(pipe: redis.client.Pipeline, delivery_id: str) -> None:
    """Forget one copy, its index entry and its push count (in the sweep's transaction)."""
    pipe.hdel(ACCEPTED_HASH, delivery_id)
    pipe.zrem(ACCEPTED_INDEX, delivery_id)
    pipe.hdel(ACCEPTED_PUSHES, delivery_id)
    pipe.hdel(STARTS, delivery_id)
