"""Put a verified delivery on the broker, durably, or say it could not.

One atomic Redis script per delivery: ``LPUSH`` of a ready Celery message to the queue's
list, plus a copy of it in the accepted set that the worker deletes once the delivery is
in PostgreSQL (see ``workers.queue``). When Redis answers, both are in Redis (persisted
per its AOF policy). A failing broker gets a short, bounded retry; past the budget the
caller answers 503 and Voucherify retries later, so nothing is acknowledged that is not
stored.

The push is one ``EVAL`` on a client of one connection kept per thread (redis-py's
``single_connection_client``), so that a ``WAIT`` after it counts that push. An error
drops the connection (redis-py's own handling); the next attempt connects again (through
Sentinel, when it names the primary: to the primary it names then, see ``client``).

With a minimum of replicas (``ENQUEUE_MIN_REPLICAS``), the push is followed by ``WAIT n
timeout`` on the same connection: Redis answers how many replicas have confirmed every
write of this connection so far. Fewer than ``n`` raises ``ReplicasUnconfirmed`` (503 with
``Retry-After``) *without* pushing again: the delivery is in the primary, not yet known to
be on a replica. If that primary survives, the delivery is processed and Voucherify's retry
of it is recorded as a duplicate of the same event id; if it is lost in a failover, the
retry brings it back. Either way the event is applied once, and no 202 was given for a
delivery only one server had.
"""

from __future__ import annotations

import logging
import random
import threading
import time

import redis

from config.per_process import PerProcess
from workers.queue.client import BrokerUnavailable, connect, error_text, primary_address
from workers.queue.keys import (
    ACCEPTED_HASH,
    ACCEPTED_INDEX,
    DELIVERY_QUEUE,
    SEEN_PREFIX,
    SEEN_SECONDS,
)
from workers.queue.message import Message

log = logging.getLogger(__name__)

# KEYS: queue, accepted hash, accepted index[, seen key]; ARGV: delivery id, accepted-at,
# message[, seen seconds]. Redis runs a script atomically and writes its effects to the
# AOF as one MULTI/EXEC: after a crash either the queued message, its accepted copy and
# the event id's mark all exist, or none does. A repeat of a marked event id pushes
# nothing and answers the delivery id that carried it first; it rewrites the mark (same
# value, same expiry) so that a ``WAIT`` after it confirms the first acceptance as well
# (replicas apply one stream in order).
ACCEPT_SCRIPT = """\
if KEYS[4] then
  local first = redis.call('GET', KEYS[4])
  if first then
    redis.call('SET', KEYS[4], first, 'XX', 'KEEPTTL')
    return first
  end
end
local length = redis.call('LPUSH', KEYS[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
if KEYS[4] then
  redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[4])
end
return length"""


class ReplicasUnconfirmed(BrokerUnavailable):
    """The delivery is in the primary, but fewer replicas than required confirmed it."""


def accept_command(
    delivery_id: str, accepted_at: float, message: bytes, event_id: str | None = None
) -> tuple[list[bytes], list[bytes]]:
    """The keys and arguments of the accept script for one delivery; with ``event_id``, a
    repeat of it pushes nothing."""
    keys = [DELIVERY_QUEUE.encode(), ACCEPTED_HASH.encode(), ACCEPTED_INDEX.encode()]
    args = [delivery_id.encode(), b"%.3f" % accepted_at, message]
    if event_id is not None:
        keys.append((SEEN_PREFIX + event_id).encode("utf-8", "surrogatepass"))
        args.append(b"%d" % SEEN_SECONDS)
    return keys, args


class DeliveryPublisher:
    def __init__(
        self,
        redis_url: str,
        budget_seconds: float,
        min_replicas: int = 0,
        replica_timeout_ms: int = 500,
    ) -> None:
        self.budget_seconds = budget_seconds
        self.min_replicas = min_replicas
        self.replica_timeout_ms = replica_timeout_ms
        # Short socket timeouts so one hung attempt cannot eat the whole budget (a WAIT
        # may take its own timeout on top).
        timeout = min(2.0, budget_seconds) + (replica_timeout_ms / 1000 if min_replicas else 0)
        self._client = connect(redis_url, timeout=timeout, retry=False)
        self._threads: PerProcess[redis.Redis] = PerProcess(
            "the publisher's client", self._one_connection_client, redis.Redis.close
        )

    def publish(
        self, body: str, delivery_id: str, received_at: str, event_id: str | None = None
    ) -> str:
        """Enqueue one delivery; the delivery id that carries its event: ``delivery_id``,
        or, for a repeat of an ``event_id`` accepted before, the first one's (nothing is
        pushed then). Raises ``BrokerUnavailable`` when Redis did not take it."""
        message = Message(body, delivery_id, received_at).encode()
        command = accept_command(delivery_id, time.time(), message, event_id)
        deadline = time.monotonic() + self.budget_seconds
        delay = 0.05
        attempt = 0
        while True:
            attempt += 1
            try:
                carried_by = self._push(command, delivery_id)
            except redis.RedisError as exc:
                remaining = deadline - time.monotonic()
                error = error_text(exc)
                log.warning(
                    "delivery.enqueue_failed",
                    extra={"delivery_id": delivery_id, "attempt": attempt, "error": error},
                )
                if remaining <= delay:
                    raise BrokerUnavailable(str(exc)) from exc
                time.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not crypto
                delay = min(delay * 2, 1.0, remaining / 2)
                continue
            self._confirm(delivery_id)
            return carried_by

    def _confirm(self, delivery_id: str) -> None:
        """``WAIT`` for the replicas, when a minimum is set; never a second push."""
        if not self.min_replicas:
            return
        try:
            confirmed = self._connection().wait(self.min_replicas, self.replica_timeout_ms)
        except redis.RedisError as exc:
            raise ReplicasUnconfirmed(f"WAIT failed: {error_text(exc)}") from exc
        if not isinstance(confirmed, int) or confirmed < self.min_replicas:
            log.warning(
                "delivery.replicas_unconfirmed",
                extra={
                    "delivery_id": delivery_id,
                    "confirmed": confirmed,
                    "required": self.min_replicas,
                },
            )
            raise ReplicasUnconfirmed(
                f"{confirmed} of {self.min_replicas} replicas confirmed the delivery"
            )

    def _push(self, command: tuple[list[bytes], list[bytes]], delivery_id: str) -> str:
        keys, args = command
        reply = self._connection().eval(ACCEPT_SCRIPT, len(keys), *keys, *args)
        if isinstance(reply, int):  # pushed: the queue's new length
            return delivery_id
        if isinstance(reply, bytes):  # a repeat: the delivery id that carried it first
            return reply.decode()
        raise redis.ResponseError(f"unexpected reply to the accept script: {reply!r}")

    def _connection(self) -> redis.Redis:
        """This thread's client of one connection (made after a fork, never shared across
        one), from the publisher's pool: its URL, timeouts, TLS and Sentinel."""
        return self._threads.get(threading.get_ident())

    def _one_connection_client(self, _thread: int) -> redis.Redis:
        return redis.Redis(
            connection_pool=self._client.connection_pool, single_connection_client=True
        )

    def ping(self) -> bool:
        return bool(self._client.ping())

    def primary(self) -> str | None:
        """``host:port`` of the Redis primary last reached (with Sentinel: the one it named)."""
        return primary_address(self._client)

    def close(self) -> None:
        self._threads.close()
        self._client.close()
        self._client.connection_pool.disconnect()
