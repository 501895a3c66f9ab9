"""The one Redis client factory of the queue contract, with its timeouts and TLS.

Every process makes its Redis clients here, so the timeouts are chosen once: short enough
that a dead Redis costs a request, a task or a scrape a few seconds at most, never a hang.

TLS (``rediss://``) is read from the URL once, by ``tls_options``: the same options go to
redis-py here and to kombu as Celery's ``broker_use_ssl`` (``workers.celery_app``). The
server's certificate is verified unless the URL says ``ssl_cert_reqs=none`` (Heroku
Redis: a self-signed certificate) or ``optional``; ``ssl_ca_certs=<path>`` names the CA
that signed it.

Sentinel (``REDIS_SENTINELS``; ``config.parsers.with_sentinels`` puts them in the URL's
query): the client is redis-py's ``Sentinel(...).master_for(REDIS_SENTINEL_MASTER)``. Each
new connection asks the Sentinels for the primary's address first; a connection error, or
a ``READONLY`` answer from a primary demoted to replica, drops the connection, and the next
one asks again: after a failover every client reaches the new primary on its own. The
primary's user, password, database number and TLS come from ``REDIS_URL``; the Sentinels
get the same TLS options and their own password (``REDIS_SENTINEL_PASSWORD``).
"""

from __future__ import annotations

import re
import ssl
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.connection import parse_url
from redis.sentinel import Sentinel, SentinelManagedConnection, SentinelManagedSSLConnection

from config.per_process import PerProcess
from config.settings import redis_tls_params, sentinel_target

HEALTH_CHECK_SECONDS = 30
"""A connection idle this long is checked (PING) before use: a restarted Redis is noticed."""


class BrokerUnavailable(Exception):
    """Redis did not take the message within the time budget; nothing was stored."""


CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def tls_options(url: str) -> dict[str, Any]:
    """The TLS options of a Redis URL, as redis-py's keyword arguments, which are also what
    kombu takes as Celery's ``broker_use_ssl``: ``{}`` for ``redis://`` and ``unix://``.

    A ``rediss://`` URL always gets an explicit ``ssl_cert_reqs``, ``CERT_REQUIRED`` unless
    its query says ``none`` or ``optional``: kombu, told nothing, would turn verification
    off with only a warning. A malformed option raises ``ValueError`` (``Settings`` checks
    the same at start-up: ``config.settings.redis_tls_params``).
    """
    params = redis_tls_params(url)
    if urlsplit(url).scheme != "rediss":
        return {}
    options: dict[str, Any] = {"ssl_cert_reqs": CERT_REQS[params.get("ssl_cert_reqs", "required")]}
    if "ssl_ca_certs" in params:
        options["ssl_ca_certs"] = params["ssl_ca_certs"]
    if "ssl_check_hostname" in params:
        options["ssl_check_hostname"] = params["ssl_check_hostname"] == "true"
    return options


def connect(url: str, timeout: float = 5.0, *, retry: bool = True) -> redis.Redis:
    """A client of its own pool. ``timeout`` bounds each connect and each reply; with
    ``retry`` off a failed command raises at once (callers with a budget of their own).
    TLS as the URL says (``tls_options``)."""
    options: dict[str, Any] = {}
    if not retry:
        options["retry"] = None
    target = sentinel_target(url)
    if target is not None:
        return _sentinel_client(
            target.url,
            target.master,
            target.sentinels,
            target.password,
            {
                "socket_timeout": timeout,
                "socket_connect_timeout": min(timeout, 5.0),
                **options,
            },
        )
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=min(timeout, 5.0),
        health_check_interval=HEALTH_CHECK_SECONDS,
        **tls_options(url),
        **options,
    )


def _sentinel_client(
    url: str,
    master: str,
    sentinels: tuple[tuple[str, int], ...],
    password: str | None,
    timeouts: dict[str, Any],
) -> redis.Redis:
    """A client of the primary the Sentinels name (``master_for``): the URL's user,
    password, database and TLS for the primary; the same timeouts and TLS for the
    Sentinels, with their own password."""
    tls = tls_options(url)
    # redis-py's own reading of the URL: the database number, user and password.
    params = parse_url(url)  # type: ignore[no-untyped-call]
    primary: dict[str, Any] = {
        k: params[k] for k in ("db", "username", "password") if params.get(k) is not None
    }
    primary["connection_class"] = SentinelManagedSSLConnection if tls else SentinelManagedConnection
    manager = Sentinel(list(sentinels), sentinel_kwargs=sentinel_options(url, password, timeouts))
    client: redis.Redis = manager.master_for(
        master, health_check_interval=HEALTH_CHECK_SECONDS, **timeouts, **tls, **primary
    )
    return client


def sentinel_options(url: str, password: str | None, timeouts: dict[str, Any]) -> dict[str, Any]:
    """How to talk to the Sentinels themselves (redis-py's ``sentinel_kwargs``, also kombu's
    transport option of that name): the timeouts, ``REDIS_URL``'s TLS, their password."""
    tls = tls_options(url)
    options: dict[str, Any] = {**timeouts, **({"ssl": True, **tls} if tls else {})}
    if password:
        options["password"] = password
    return options


# redis-py's MasterNotFoundError names each Sentinel by the whole repr of its client (about
# 1 KB each, every connection setting); the address says which one it was.
_SENTINEL_REPR = re.compile(r"<redis\.client\.Redis\(<.*?,host=([^,]+),port=(\d+),.*?\)>\)>\)>")


def error_text(exc: BaseException) -> str:
    """``Type: message`` of a Redis error for a log line, each Sentinel named by its address.

    Not ``repr()``: redis-py 8 reduces it to "network:ConnectionError", hiding the reason (a
    refused TLS certificate, a wrong password). Never holds a secret (redis-py redacts them).
    """
    message = _SENTINEL_REPR.sub(r"Sentinel \1:\2", str(exc))
    return f"{type(exc).__name__}: {message}"


def primary_address(client: redis.Redis) -> str | None:
    """``host:port`` of the primary ``client`` last connected to (Sentinel: the one the
    Sentinels named; None before the first connection), without asking anything."""
    pool = client.connection_pool
    address = getattr(pool, "master_address", None)  # redis-py's SentinelConnectionPool
    if address is None:
        kwargs = pool.connection_kwargs
        if "host" not in kwargs or getattr(pool, "service_name", None):
            return None
        address = (kwargs["host"], kwargs.get("port", 6379))
    host, port = address
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


_clients: PerProcess[redis.Redis] = PerProcess(
    "the Redis client", lambda key: connect(*key), redis.Redis.close
)


def process_client(url: str, timeout: float = 5.0) -> redis.Redis:
    """This process's client for ``url`` and ``timeout`` (made after a fork, never shared
    across one)."""
    return _clients.get((url, timeout))
