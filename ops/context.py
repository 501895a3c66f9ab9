"""Where the ops tools get PostgreSQL and Redis from.

The web process uses the process's pool (``workers.db.get_pool``: opened lazily on the first
ops request or scrape, re-opened after a fork, ``WEB_DB_POOL_MAX_SIZE`` connections at most,
statements prepared as ``DATABASE_POOLER`` allows), never at import and never on the webhook
path. The CLI, a short-lived process, opens one plain connection per transaction instead.
Every ops transaction gets a ``statement_timeout`` so a slow query cannot hold a web thread
for long: set for that transaction only (``set_config(..., true)``), so behind PgBouncer in
transaction mode it never stays on a server connection another client gets next.

In the web process ``ops.install`` puts the context in ``app.extensions``; the views read it
with ``current()`` (and the token with ``current_token()``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import psycopg
import redis
from flask import current_app
from psycopg_pool import ConnectionPool

from config.settings import Settings
from workers import queue

if TYPE_CHECKING:
    from workers.jobs.voucherify_api import VoucherifyApi

Connect = Callable[[float], AbstractContextManager[psycopg.Connection[Any]]]

EXTENSION = "ops_context"
"""``app.extensions`` key of the web process's ``OpsContext``."""


class OpsContext:
    def __init__(self, settings: Settings, connect: Connect | None = None) -> None:
        self.settings = settings
        self.database_url: str = settings.database_url
        self.redis_url: str = settings.redis_url
        self._in_process_pool = connect is None
        self._connect = connect or self._pooled
        self._redis: redis.Redis | None = None
        self._api: VoucherifyApi | None = None
        self._lock = threading.Lock()

    def _process_pool(self) -> ConnectionPool:
        from workers.db import settings_pool

        return settings_pool(self.settings, self.settings.web_db_pool_max_size)

    @contextlib.contextmanager
    def pool(self) -> Iterator[ConnectionPool]:
        """A pool for what runs through the workers' own code (a flag's action, which
        applies its result as an event): the web process's, or one for the CLI's command."""
        if self._in_process_pool:
            yield self._process_pool()
            return
        kwargs = {"prepare_threshold": None}
        with ConnectionPool(self.database_url, min_size=1, max_size=3, kwargs=kwargs) as pool:
            yield pool

    def voucherify_api(self, pool: ConnectionPool) -> VoucherifyApi | None:
        """The API client of a person's actions (one shared budget with the jobs; a call
        waits ``ACTION_MAX_WAIT`` at most for its slot); None when not configured."""
        # The jobs' package (and through it the delivery path): imported when acting only.
        from workers.jobs.flag_actions import ACTION_MAX_WAIT
        from workers.jobs.voucherify_api import Budget, VoucherifyApi

        s = self.settings
        url, app_id, token = s.voucherify_api_url, s.voucherify_app_id, s.voucherify_app_token
        if not (url and app_id and token):
            return None
        with self._lock:
            if self._api is None or self._api.budget.pool is not pool:
                budget = Budget(
                    pool, s.voucherify_api_calls_per_minute, s.voucherify_api_calls_per_day
                )
                self._api = VoucherifyApi(url, app_id, token, budget, max_wait=ACTION_MAX_WAIT)
            return self._api

    def _pooled(self, timeout: float) -> AbstractContextManager[psycopg.Connection[Any]]:
        return self._process_pool().connection(timeout=timeout)

    @contextlib.contextmanager
    def transaction(
        self, statement_timeout_ms: int = 10_000, wait_seconds: float = 5.0
    ) -> Iterator[psycopg.Connection[Any]]:
        """One transaction: committed when the block ends, rolled back when it raises."""
        with self._connect(wait_seconds) as conn, conn.transaction():
            conn.execute(
                "SELECT set_config('statement_timeout', %(ms)s, true)",
                {"ms": str(statement_timeout_ms)},
            )
            yield conn

    def redis(self) -> redis.Redis:
        with self._lock:  # gthread: several requests may ask at once
            if self._redis is None:
                self._redis = queue.connect(self.redis_url, timeout=2, retry=False)
            return self._redis

    def queue_depths(self) -> dict[str, int]:
        return queue.depths(self.redis())

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
            self._redis = None


def direct_connect(database_url: str) -> Connect:
    """One new connection per transaction: for the CLI, which runs a few and exits.

    Nothing is prepared on it: a connection that lives for one transaction would gain
    nothing, and behind PgBouncer the statement would outlive it on the server connection,
    where the next client's statement of the same name clashes with it."""

    def connect(timeout: float) -> AbstractContextManager[psycopg.Connection[Any]]:
        return psycopg.connect(
            database_url, connect_timeout=max(2, int(timeout)), prepare_threshold=None
        )

    return connect


def current() -> OpsContext:
    """The ``OpsContext`` of the app handling the request (``ops.install`` put it there)."""
    context: OpsContext = current_app.extensions[EXTENSION]
    return context


def current_token() -> str:
    """``OPS_API_TOKEN``: the blueprints are only mounted when it is set."""
    token = current().settings.ops_api_token
    if token is None:
        raise RuntimeError("the ops blueprints are mounted without OPS_API_TOKEN")
    return token
