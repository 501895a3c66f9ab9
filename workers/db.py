"""One PostgreSQL connection pool per process, opened in the process that uses it.

``get_pool()`` opens the pool lazily, in the process that asks (``config.per_process``),
so a pool is never shared across a fork (prefork workers, gunicorn) whatever the start
order.

Its connections prepare no statement unless the caller asks (``prepare_threshold``, from
``Settings.db_prepare_threshold``): behind PgBouncer in transaction mode each transaction
may run on another server connection, and a statement psycopg prepared on one is missing
on the next, or already there under the same name for another client. Preparing nothing
is right whatever ``DATABASE_URL`` points at; preparing is only an optimisation. Nothing
else of a session is relied on: every setting is made per transaction (``SET LOCAL``,
``set_config(..., true)``), every lock is a row lock or a transaction's advisory lock.
"""

from __future__ import annotations

import os

from psycopg_pool import ConnectionPool

from config.per_process import PerProcess
from config.settings import Settings


def _open_pool(
    database_url: str, *, max_size: int, prepare_threshold: int | None
) -> ConnectionPool:
    pid = os.getpid()
    pool = ConnectionPool(
        database_url,
        min_size=1,
        max_size=max_size,
        timeout=5.0,  # waiting longer for a connection is a transient fault
        # The pool re-connects with a doubling delay (1, 2, 4 ... s) until this many
        # seconds, then gives up and the next request starts afresh. The default (300 s)
        # left workers idle for about as long again as PostgreSQL had been down
        # (tests/fault/test_under_fire.py: 8-10 s after a 20 s outage); 10 s keeps the gap
        # between attempts at 4 s at most.
        reconnect_timeout=10.0,
        kwargs={
            "connect_timeout": 3,
            "application_name": f"voucherify-pipeline-{pid}",
            "prepare_threshold": prepare_threshold,  # None: never prepare
        },
        open=False,
        name=f"pool-{pid}",
    )
    # Do not wait for the first connection: a worker must start even while PostgreSQL is
    # down, and retry its events until it is back.
    pool.open(wait=False)
    return pool


_pools: PerProcess[ConnectionPool] = PerProcess(
    "the PostgreSQL pool", _open_pool, ConnectionPool.close
)


def get_pool(
    database_url: str, max_size: int = 4, *, prepare_threshold: int | None = None
) -> ConnectionPool:
    """This process's pool for ``database_url``, of at most ``max_size`` connections (made
    on the first call; asked again with other parameters, ``ValueError``)."""
    return _pools.get(database_url, max_size=max_size, prepare_threshold=prepare_threshold)


def settings_pool(settings: Settings, max_size: int | None = None) -> ConnectionPool:
    """This process's pool as the settings say: their URL, pool size (unless ``max_size``)
    and ``db_prepare_threshold``."""
    return get_pool(
        settings.database_url,
        settings.db_pool_max_size if max_size is None else max_size,
        prepare_threshold=settings.db_prepare_threshold,
    )


def close_pool() -> None:
    _pools.close()
