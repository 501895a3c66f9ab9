"""One PostgreSQL connection pool per process, opened in the process that uses it.

``get_pool()`` opens the pool lazily and re-opens it when the process id changed, so a
pool is never shared across a fork (prefork workers, gunicorn) whatever the start order.

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
import threading

from psycopg_pool import ConnectionPool

_lock = threading.Lock()
_pool: ConnectionPool | None = None
_pool_pid: int | None = None
_pool_url: str | None = None


def get_pool(
    database_url: str, max_size: int = 4, *, prepare_threshold: int | None = None
) -> ConnectionPool:
    """This process's pool (made on the first call; later calls get it, whatever they pass
    but the URL), of at most ``max_size`` connections."""
    global _pool, _pool_pid, _pool_url
    pid = os.getpid()
    if _pool is not None and _pool_pid == pid and _pool_url == database_url:
        return _pool
    with _lock:
        if _pool is None or _pool_pid != pid or _pool_url != database_url:
            if _pool is not None and _pool_pid == pid:
                _pool.close()
            _pool = ConnectionPool(
                database_url,
                min_size=1,
                max_size=max_size,
                timeout=5.0,  # waiting longer for a connection is a transient fault
                # The pool re-connects with a doubling delay (1, 2, 4 ... s) until this
                # many seconds, then gives up and the next request starts afresh. The
                # default (300 s) left workers idle for about as long again as PostgreSQL
                # had been down (tests/fault/test_under_fire.py: 8-10 s after a 20 s
                # outage); 10 s keeps the gap between attempts at 4 s at most.
                reconnect_timeout=10.0,
                kwargs={
                    "connect_timeout": 3,
                    "application_name": f"voucherify-pipeline-{pid}",
                    "prepare_threshold": prepare_threshold,  # None: never prepare
                },
                open=False,
                name=f"pool-{pid}",
            )
            # Do not wait for the first connection: a worker must start even while
            # PostgreSQL is down, and retry its events until it is back.
            _pool.open(wait=False)
            _pool_pid, _pool_url = pid, database_url
    return _pool


def close_pool() -> None:
    global _pool, _pool_pid, _pool_url
    with _lock:
        if _pool is not None and _pool_pid == os.getpid():
            _pool.close()
        _pool, _pool_pid, _pool_url = None, None, None
