"""Ordered SQL migrations, applied by the ``release`` process (``python -m migrations``).

Each ``NNNN_name.sql`` file runs once, in name order, in a savepoint of one transaction;
applied versions are recorded in ``schema_migrations``. An advisory lock makes two release
processes started at once take turns, so a second run on an up-to-date database does
nothing.

The lock is the transaction's (``pg_advisory_xact_lock``), never the session's, and a
migration file changes no session state (no ``SET`` without ``LOCAL``): behind PgBouncer in
transaction mode the release step's server connection serves other clients between
transactions, so a session lock would be held by -- or released from -- the wrong client,
and a session setting would go on to whoever gets that connection next. Taken first in
the one transaction that applies everything, the lock lives and ends with it, on the one
server connection PgBouncer gives that transaction.
"""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any

import psycopg

log = logging.getLogger(__name__)

_LOCK_KEY = 0x766F7563  # "vouc": one advisory lock for all migration runs


def migration_files() -> list[tuple[str, str]]:
    files = [f for f in resources.files(__name__).iterdir() if f.name.endswith(".sql")]
    return [
        (f.name.removesuffix(".sql"), f.read_text()) for f in sorted(files, key=lambda f: f.name)
    ]


def migration_status(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Every migration the code has, in order, with when it was applied (None: pending),
    and any version the database records that the code does not have (``known`` False)."""
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    applied: dict[str, Any] = {}
    if exists and exists[0]:
        rows = conn.execute("SELECT version, applied_at FROM schema_migrations").fetchall()
        applied = {version: at for version, at in rows}
    status = [
        {"version": version, "applied_at": applied.pop(version, None), "known": True}
        for version, _ in migration_files()
    ]
    status += [
        {"version": version, "applied_at": at, "known": False}
        for version, at in sorted(applied.items())
    ]
    return status


def apply_migrations(conn: psycopg.Connection[Any]) -> list[str]:
    """Apply what is missing; return the versions applied now (empty when up to date)."""
    applied_now: list[str] = []
    with conn.transaction():
        # Waits while another release holds it; released when this transaction ends.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        for version, sql in migration_files():
            if version in done:
                continue
            with conn.transaction():
                conn.execute(sql.encode())
                conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
            applied_now.append(version)
            log.info("migration.applied", extra={"version": version})
    return applied_now
