"""Put a verified delivery on the broker, durably, or say it could not.

One atomic Redis script per delivery: ``LPUSH`` of a ready Celery message to the queue's
list, plus a copy of it in the accepted set (``ACCEPTED_HASH`` and its time index) that
the worker deletes once the delivery is in PostgreSQL. The copy closes the window in
which Celery's Redis transport holds a message nowhere but in a worker's memory; the
re-drive job pushes again what was accepted and never recorded. When Redis answers, both
are in Redis (persisted per its AOF policy, see the README). A failing broker gets a
short, bounded retry; past the budget the caller answers 503 and Voucherify retries
later, so nothing is acknowledged that is not stored.

The push is one write and one read on a connection kept per thread: the command is
packed here in a single buffer and its integer reply read back. redis-py's client calls
do the same round trip but cost several times more CPU per call on this path (a pool
check-out that polls the socket, observability hooks, and a 7 KB message sent in three
writes), which the receiver benchmark showed as a third of its throughput. Any error
drops the connection, so a reply is never left half-read for the next request; the next
attempt connects again.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time

import redis
from redis.connection import AbstractConnection

from workers.messages import ACCEPTED_HASH, ACCEPTED_INDEX, DELIVERY_QUEUE, delivery_message

log = logging.getLogger(__name__)


class BrokerUnavailable(Exception):
    """The message could not be stored within the time budget."""


# KEYS: queue, accepted hash, accepted index; ARGV: delivery id, accepted-at, message.
# Redis runs a script atomically and writes its effects to the AOF as one MULTI/EXEC:
# after a crash either both the queued message and its accepted copy exist, or neither.
ACCEPT_SCRIPT = b"""\
local length = redis.call('LPUSH', KEYS[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
return length"""


def pack_command(*args: bytes) -> bytes:
    """One Redis command in the wire protocol (RESP), as one buffer."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def accept_command(delivery_id: str, accepted_at: float, message: bytes) -> bytes:
    """``EVAL`` of the accept script for one delivery."""
    return pack_command(
        b"EVAL",
        ACCEPT_SCRIPT,
        b"3",
        DELIVERY_QUEUE.encode(),
        ACCEPTED_HASH.encode(),
        ACCEPTED_INDEX.encode(),
        delivery_id.encode(),
        b"%.3f" % accepted_at,
        message,
    )


class DeliveryPublisher:
    def __init__(self, redis_url: str, budget_seconds: float) -> None:
        self.budget_seconds = budget_seconds
        # Short socket timeouts so one hung attempt cannot eat the whole budget.
        self._pool = redis.ConnectionPool.from_url(
            redis_url,
            socket_connect_timeout=min(1.0, budget_seconds),
            socket_timeout=min(2.0, budget_seconds),
            health_check_interval=30,
            retry=None,
        )
        self._client = redis.Redis(connection_pool=self._pool)  # for ping()
        self._local = threading.local()

    def publish(self, body: str, delivery_id: str, received_at: str) -> None:
        message = delivery_message(body, delivery_id, received_at)
        command = accept_command(delivery_id, time.time(), message)
        deadline = time.monotonic() + self.budget_seconds
        delay = 0.05
        attempt = 0
        while True:
            attempt += 1
            try:
                self._push(command)
                return
            except redis.RedisError as exc:
                remaining = deadline - time.monotonic()
                log.warning(
                    "delivery.enqueue_failed",
                    extra={"delivery_id": delivery_id, "attempt": attempt, "error": repr(exc)},
                )
                if remaining <= delay:
                    raise BrokerUnavailable(str(exc)) from exc
                time.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not crypto
                delay = min(delay * 2, 1.0, remaining / 2)

    def _push(self, command: bytes) -> None:
        connection = self._connection()
        try:
            # redis-py sends bytes as they are (what we want); it leaves this call untyped.
            connection.send_packed_command([command])  # type: ignore[no-untyped-call]
            reply = connection.read_response()
        except BaseException:
            connection.disconnect()  # type: ignore[no-untyped-call]
            raise
        if not isinstance(reply, int):  # the script answers the queue's new length
            connection.disconnect()  # type: ignore[no-untyped-call]
            raise redis.ResponseError(f"unexpected reply to the accept script: {reply!r}")

    def _connection(self) -> AbstractConnection:
        """This thread's connection (created after a fork, never shared across one)."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.pid = os.getpid()
            local.connection = self._pool.connection_class(**self._pool.connection_kwargs)
        connection: AbstractConnection = local.connection
        return connection

    def ping(self) -> bool:
        return bool(self._client.ping())

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.disconnect()
        self._client.close()
        self._pool.disconnect()
