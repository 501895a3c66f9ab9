"""kombu's Redis transport, with one fix: a failed acknowledgement frees its prefetch slot;
and one addition: ``QoS.ack_many``, a batch's acknowledgements in one round trip.

Found while building the fault suite (``tests/fault/test_under_fire.py``; reproduced
alone by ``tests/fault/test_broker_restart.py``): Redis restarted while a worker had its
whole prefetch window in hand (``worker_prefetch_multiplier`` x concurrency messages: any
backlog), then the late acknowledgements of those tasks all failed on the dead
connection. kombu's ``QoS.ack`` writes to Redis *before* it forgets the message locally,
so each failed ack left its delivery tag counted as in hand; with the window full, the
consumer never asked Redis for a message again, so it never noticed the connection was
gone either. The worker stayed up, logged nothing more, and consumed nothing until
restarted by hand.

Here a failed ack (or reject) still frees the slot, then raises as before (Celery logs
"Couldn't ack"). Nothing is lost by it: the broker never heard the ack, so the message
stays in kombu's ``unacked`` hash and is delivered again after the visibility timeout;
the task then finds its event already applied and records a duplicate.

``use_for_redis_urls()`` (called by ``make_celery``) makes the ``redis://`` and
``rediss://`` schemes name this transport instead of kombu's own, and ``sentinel://``
(kombu's Sentinel transport: every new connection asks the Sentinels for the primary,
see ``workers.celery_app``) the same fix on kombu's ``SentinelChannel``. Everything else is
kombu's: the URL is parsed as before, ``rediss://`` still turns TLS on (kombu decides that
by the scheme's name, which is why this is not done with Celery's ``broker_transport``),
and the transport options apply unchanged.

Checked on kombu 5.7.0 (pinned ``>=5.7,<5.8``). Upstream: no issue found for the
failed ack holding its slot nor for a one-round-trip ack of many messages (the issue we
would file is in the issue-25 notes); near it, celery/kombu#857 (acks on a dead
connection, closed).
"""

# kombu's QoS methods carry no annotations; calling them is the whole point here.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import json
from typing import Any

import kombu.transport
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

SCHEMES = {"redis": "Transport", "rediss": "Transport", "sentinel": "SentinelTransport"}


class QoS(kombu_redis.QoS):
    def ack(self, delivery_tag: str) -> None:
        try:
            super().ack(delivery_tag)  # Redis first, then the local slot
        except Exception:
            virtual.QoS.ack(self, delivery_tag)  # the local slot, whatever Redis said
            raise

    def ack_many(self, delivery_tags: list[str]) -> None:
        """Acknowledge many messages in one Redis round trip (a batch task's batch), with
        the same rule: the local slots are freed whatever Redis said."""
        try:
            with self.pipe_or_acquire() as pipe:
                for tag in delivery_tags:
                    self._remove_from_indices(tag, pipe)
                pipe.execute()
        finally:
            for tag in delivery_tags:
                virtual.QoS.ack(self, tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        try:
            super().reject(delivery_tag, requeue=requeue)
        except Exception:
            virtual.QoS.ack(self, delivery_tag)
            raise


class Channel(kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(kombu_redis.SentinelChannel):
    QoS = QoS


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def mark_acknowledged(message: Any) -> None:
    """A message ``QoS.ack_many`` acknowledged, marked so as ``Message.ack`` marks it
    (``kombu.message.Message._state``, a slot): a second ack of it raises, as kombu's own
    would, instead of acknowledging it twice."""
    message._state = "ACK"


def use_for_redis_urls() -> None:
    """Make broker URLs with a Redis scheme use ``Transport`` (``sentinel://``:
    ``SentinelTransport``), idempotent, per process."""
    for scheme, transport in SCHEMES.items():
        kombu.transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:{transport}"
        # kombu caches the class it resolved for a name; none is resolved before the app
        # connects, but a stale entry would silently keep kombu's own class.
        getattr(kombu.transport, "_transport_cache", {}).pop(scheme, None)


def held_task_ids(client: Any) -> set[str]:
    """The task ids of the messages kombu's Redis transport holds as delivered and not yet
    acknowledged (its ``unacked`` hash: tag -> ``[message, exchange, routing_key]`` as
    JSON), read in one round trip. A message a worker took is there until its ack, and
    kombu restores it to its queue after the visibility timeout if the worker died.

    The key and the value's shape are kombu's storage format (``QoS.append``, checked on
    kombu 5.7; ``tests/compat`` reads back a message Celery's own worker holds).
    """
    held: set[str] = set()
    for raw in client.hvals(kombu_redis.Channel.unacked_key):
        try:
            task_id = json.loads(raw)[0]["headers"]["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            continue
        if task_id is not None:
            held.add(str(task_id))
    return held
