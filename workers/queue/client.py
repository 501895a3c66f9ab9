"""The one Redis client factory of the queue contract, with its timeouts.

Every process makes its Redis clients here, so the timeouts are chosen once: short enough
that a dead Redis costs a request, a task or a scrape a few seconds at most, never a hang.
"""

from __future__ import annotations

import os
import threading

import redis

HEALTH_CHECK_SECONDS = 30
"""A connection idle this long is checked (PING) before use: a restarted Redis is noticed."""


class BrokerUnavailable(Exception):
    """Redis did not take the message within the time budget; nothing was stored."""


def connect(url: str, timeout: float = 5.0, *, retry: bool = True) -> redis.Redis:
    """A client of its own pool. ``timeout`` bounds each connect and each reply; with
    ``retry`` off a failed command raises at once (callers with a budget of their own)."""
    options: dict[str, object] = {}
    if not retry:
        options["retry"] = None
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=min(timeout, 5.0),
        health_check_interval=HEALTH_CHECK_SECONDS,
        **options,
    )


_lock = threading.Lock()
_clients: dict[tuple[int, str, float], redis.Redis] = {}


def process_client(url: str, timeout: float = 5.0) -> redis.Redis:
    """This process's client for ``url`` and ``timeout`` (made after a fork, never shared
    across one)."""
    key = (os.getpid(), url, timeout)
    with _lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = connect(url, timeout)
        return client
