"""One packed Redis command sent in one write, its reply read back, on a connection of our own.

redis-py's client calls make the same round trip but cost several times more CPU per call
on the receiver's hot path (a pool check-out that polls the socket, observability hooks,
and a 7 KB message sent in three writes), which the receiver benchmark showed as a third
of its throughput. This uses methods and attributes of redis-py's connection class that
are not part of its documented client API: ``send_packed_command``, ``read_response``,
``disconnect``, ``connect`` (when its socket, ``_sock``, is gone: a Sentinel-managed
connection asks the Sentinels for the primary there), and the pool's
``connection_class`` / ``connection_kwargs`` to make a connection with the pool's
settings (URL, timeouts, TLS, Sentinel).

Any error drops the connection, so a reply is never left half-read for the next call.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.connection import AbstractConnection


def pack_command(*args: bytes) -> bytes:
    """One Redis command in the wire protocol (RESP), as one buffer."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def new_connection(pool: redis.ConnectionPool) -> AbstractConnection:
    """A connection with the pool's settings that the pool does not manage."""
    connection: AbstractConnection = pool.connection_class(**pool.connection_kwargs)
    return connection


def round_trip(connection: AbstractConnection, command: bytes) -> Any:
    """Send one packed command, read its reply; on any error the connection is dropped."""
    try:
        # Connect first, through the connection's own ``connect``: a Sentinel-managed
        # connection asks the Sentinels for the primary there. ``send_packed_command``
        # alone would connect to the connection's default address (localhost:6379).
        # Only when not connected (``_sock``): ``connect`` goes through redis-py's retry
        # machinery even when it has nothing to do, which this hot path does not pay.
        if connection._sock is None:
            connection.connect()  # type: ignore[no-untyped-call]
        # redis-py sends bytes as they are (what we want); it leaves this call untyped.
        connection.send_packed_command([command])  # type: ignore[no-untyped-call]
        return connection.read_response()
    except BaseException:
        drop(connection)
        raise


def drop(connection: AbstractConnection) -> None:
    connection.disconnect()  # type: ignore[no-untyped-call]
