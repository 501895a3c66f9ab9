"""``/readyz``: do Redis and PostgreSQL answer? Asked cheaply, whoever asks and how often.

Anyone may call ``/readyz`` (load balancers, orchestrators, a flood), so an answer costs at
most one check of each server per ``CACHE_SECONDS`` per process: a ``CachedProbe`` keeps
its last answer that long, and a lock lets one thread check at a time while the others
serve the last answer. A failure is cached like a success, so an outage is not made worse
by the probes, and is reported within ``CACHE_SECONDS`` plus a check's timeout.

PostgreSQL is checked through a pool of its own (one connection per process at most,
opened on the first check, re-opened after a fork), never the ops pool of
``workers.db``: a probe can neither wait behind ops work nor take a connection from it.
Every timeout of the check is ``CHECK_TIMEOUT_SECONDS``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from psycopg_pool import ConnectionPool

from config.per_process import PerProcess

log = logging.getLogger(__name__)

CACHE_SECONDS = 1.0
"""How long an answer is served again before the server is asked anew."""
CHECK_TIMEOUT_SECONDS = 2.0
"""Connect, wait for the pool's connection, run the statement: each bounded by this."""
OVERDUE_SECONDS = 5.0
"""A check still running after this long (a hung server) is reported as failed."""
OVERDUE = "Timeout"
"""The failure reported while a check is overdue."""


@dataclass(frozen=True, slots=True)
class _Answer:
    at: float
    failure: str | None


class CachedProbe:
    """One server's check, run by one thread at a time and at most once per ``cache_seconds``.

    ``failure()`` is None when the server answered, else the error's class name. Callers
    that arrive while another thread checks get the last answer (the first ones, with no
    answer yet, wait for the check); past ``overdue_seconds`` they get ``OVERDUE``.
    """

    def __init__(
        self,
        name: str,
        check: Callable[[], object],
        cache_seconds: float = CACHE_SECONDS,
        overdue_seconds: float = OVERDUE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.cache_seconds = cache_seconds
        self.overdue_seconds = overdue_seconds
        self._check = check
        self._clock = clock
        self._lock = threading.Lock()
        self._answer: _Answer | None = None
        self._checking_since: float | None = None

    def failure(self) -> str | None:
        if fresh := self._fresh():
            return fresh.failure
        if self._lock.acquire(blocking=False):
            return self._run()
        # Another thread is checking: its answer is due within overdue_seconds of its start.
        since = self._checking_since
        running = 0.0 if since is None else self._clock() - since
        last = self._answer
        if last is not None and running < self.overdue_seconds:
            return last.failure  # older than the window by at most one check
        remaining = self.overdue_seconds - running
        if remaining > 0 and self._lock.acquire(timeout=remaining):
            if fresh := self._fresh():  # the check we waited for
                self._lock.release()
                return fresh.failure
            return self._run()
        return OVERDUE

    def _fresh(self) -> _Answer | None:
        """The last answer, while it is younger than the window."""
        answer = self._answer
        if answer is not None and self._clock() - answer.at < self.cache_seconds:
            return answer
        return None

    def _run(self) -> str | None:
        """Check (the caller holds the lock; released here)."""
        self._checking_since = self._clock()
        try:
            try:
                self._check()
            except Exception as exc:  # noqa: BLE001 - any failure means not ready
                failure: str | None = type(exc).__name__
            else:
                failure = None
            previous = self._answer
            if previous is None or previous.failure != failure:
                level = logging.INFO if failure is None else logging.WARNING
                log.log(level, "readyz.changed", extra={"source": self.name, "error": failure})
            self._answer = _Answer(self._clock(), failure)
            return failure
        finally:
            self._checking_since = None
            self._lock.release()


class Readiness:
    """The probes of ``/readyz``, one per server, asked in order."""

    def __init__(
        self,
        checks: Mapping[str, Callable[[], object]],
        cache_seconds: float = CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.probes = [
            CachedProbe(name, check, cache_seconds=cache_seconds, clock=clock)
            for name, check in checks.items()
        ]

    def failures(self) -> dict[str, str]:
        """The servers that did not answer, with the error's class name; empty when ready."""
        failed = {}
        for probe in self.probes:
            failure = probe.failure()
            if failure is not None:
                failed[probe.name] = failure
        return failed


# --- PostgreSQL --------------------------------------------------------------------------


def _open_readiness_pool(database_url: str) -> ConnectionPool:
    pid = os.getpid()
    timeout_ms = str(int(CHECK_TIMEOUT_SECONDS * 1000))
    pool = ConnectionPool(
        database_url,
        min_size=0,
        max_size=1,
        timeout=CHECK_TIMEOUT_SECONDS,
        # A failed connect is tried again for about one check's time, then the pool gives
        # up until the next check asks: no retry loop against a database that is down,
        # one attempt (or three) per check instead.
        reconnect_timeout=CHECK_TIMEOUT_SECONDS,
        num_workers=1,
        kwargs={
            "autocommit": True,  # SELECT 1 is the one round trip: no COMMIT after
            "connect_timeout": max(1, int(CHECK_TIMEOUT_SECONDS)),
            # No startup options of ours (there was ``-c statement_timeout``): they are
            # session state, which PgBouncer in transaction mode refuses ("unsupported
            # startup parameter: options") or, told to ignore them, drops; and SELECT 1
            # waits on nothing a server-side timeout would end. The connect, pool and TCP
            # timeouts bound the check, and the probe's OVERDUE answer bounds /readyz
            # (docs/deployment.md, PgBouncer). Unacknowledged bytes this long (a peer gone
            # silent) fail the check instead of hanging it until the kernel gives up.
            "tcp_user_timeout": timeout_ms,
            "application_name": f"voucherify-readyz-{pid}",
            # The same SELECT 1 on and on would be prepared after psycopg's 5 runs: behind
            # PgBouncer that statement would be missing on, or clash with, the next server
            # connection. Never prepared, whatever the pooler.
            "prepare_threshold": None,
        },
        open=False,
        name=f"readyz-{pid}",
    )
    pool.open(wait=False)  # a web process must start even while PostgreSQL is down
    return pool


_readiness_pools: PerProcess[ConnectionPool] = PerProcess(
    "the readiness pool", _open_readiness_pool, ConnectionPool.close
)


def readiness_pool(database_url: str) -> ConnectionPool:
    """This process's pool of the PostgreSQL check: at most one connection, kept between
    checks, made on demand (none before the first check); made again after a fork."""
    return _readiness_pools.get(database_url)


def close_readiness_pool() -> None:
    _readiness_pools.close()


def check_database(database_url: str) -> None:
    """One ``SELECT 1`` on the readiness pool's connection; raises when it cannot be had."""
    with readiness_pool(database_url).connection(timeout=CHECK_TIMEOUT_SECONDS) as conn:
        conn.execute("SELECT 1")
