"""The queue's lists: push deliveries again, park and unpark them, read the depths."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import redis

from workers.queue.client import BrokerUnavailable
from workers.queue.keys import ACCEPTED_HASH, DELIVERY_QUEUE, PARKED_QUEUE, QUEUES
from workers.queue.message import Message

log = logging.getLogger(__name__)


def requeue(client: redis.Redis, messages: Sequence[Message]) -> None:
    """Queue deliveries of events the inbox already holds (re-drive, replay), in one LPUSH.

    No accepted copy: the event's row is in PostgreSQL, unfinished, and the re-drive job
    pushes it again if this message is lost. Raises ``BrokerUnavailable`` when Redis
    did not take them (then none was queued).
    """
    if not messages:
        return
    try:
        client.lpush(DELIVERY_QUEUE, *(m.encode() for m in messages))
    except redis.RedisError as exc:
        raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc


def park(client: redis.Redis, message: Message) -> None:
    """Keep a delivery the database could not take, in a list nobody consumes.

    ``unpark`` moves it back once PostgreSQL answers. Raises ``redis.RedisError`` when
    Redis is gone too: the caller lets Celery keep the message (late ack), not lost.
    """
    client.lpush(PARKED_QUEUE, message.encode())
    log.error("delivery.parked", extra={"delivery_id": message.delivery_id})


def unpark(client: redis.Redis, limit: int) -> int:
    """Move parked deliveries back to the queue, oldest first, one atomic move each.

    For when PostgreSQL has answered again. Bounded by ``limit`` so one run cannot flood
    the queue; the rest waits for the next run.
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


def depths(client: redis.Redis) -> dict[str, int]:
    """Messages waiting in each list, and the size of the accepted set, in one round trip.

    The accepted set follows the queue; one that keeps growing while the queue is empty
    means workers are not recording what they take.
    """
    with client.pipeline(transaction=False) as pipe:
        for name in QUEUES:
            pipe.llen(name)
        pipe.hlen(ACCEPTED_HASH)
        counts = pipe.execute()
    return {name: int(n) for name, n in zip((*QUEUES, ACCEPTED_HASH), counts, strict=True)}
