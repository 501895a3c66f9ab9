"""``DATABASE_URL``'s query (``sslmode=require``, as managed PostgreSQL hands it out) reaches
psycopg unchanged, in every place that connects: nothing strips or rewrites it."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool

from config.settings import Settings
from ops.context import direct_connect
from web.health import close_readiness_pool, readiness_pool
from workers.db import close_pool, get_pool


def with_query(url: str, query: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query="&".join(q for q in (parts.query, query) if q)))


def effective(pool: ConnectionPool) -> dict[str, Any]:
    """What the pool hands libpq: its conninfo with its keyword arguments merged in (as
    psycopg's ``connect`` does; ``autocommit`` is psycopg's own, not libpq's)."""
    kwargs = {k: v for k, v in pool.kwargs.items() if k != "autocommit"}
    return conninfo_to_dict(make_conninfo(pool.conninfo, **kwargs))


def test_settings_keep_the_query_of_database_url() -> None:
    url = "postgresql://vfy:s3cret@db.example.com:5432/vfy?sslmode=require&sslrootcert=system"
    settings = Settings.from_env({"DATABASE_URL": url, "REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert settings.database_url == url
    assert "s3cret" not in repr(settings)


def test_sslmode_require_reaches_psycopg_unchanged(database_url: str) -> None:
    url = with_query(database_url, "sslmode=require")
    settings = Settings.from_env({"DATABASE_URL": url, "REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert settings.database_url == url

    # The pool of the worker, the jobs and the web's ops tools.
    try:
        assert effective(get_pool(settings.database_url, 1))["sslmode"] == "require"
    finally:
        close_pool()
    # The web's /readyz pool, which adds no startup options of its own (PgBouncer refuses
    # the `options` startup parameter).
    try:
        info = effective(readiness_pool(settings.database_url))
        assert info["sslmode"] == "require"
        assert "options" not in info
    finally:
        close_readiness_pool()

    # The CLI's connection, for real: libpq either refuses a server without TLS because
    # TLS was required, or uses TLS. Both prove it received sslmode=require.
    refused: str | None = None
    try:
        with direct_connect(settings.database_url)(5) as conn:
            in_use = conn.pgconn.ssl_in_use
    except psycopg.OperationalError as exc:
        refused = str(exc)
    if refused is not None:  # the embedded server has no TLS
        assert "SSL" in refused, refused
    else:  # a server with TLS (TEST_DATABASE_URL): the same with sslmode=disable is plain
        assert in_use
        with direct_connect(with_query(database_url, "sslmode=disable"))(5) as conn:
            assert not conn.pgconn.ssl_in_use
