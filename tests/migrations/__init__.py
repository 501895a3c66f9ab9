"""The migration tests; ``migrate_before`` makes a database as it was before a migration,
``migrated_across`` one that went through it with rows of the older schema."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from migrations import apply_migrations, migration_files
from tests.conftest import create_database, drop_database


def migrate_before(conn: psycopg.Connection[Any], version: str) -> None:
    """Apply the migrations older than ``version`` (recorded as the release would), on a
    database made with ``create_database(..., migrated=False)``."""
    conn.execute(
        "CREATE TABLE schema_migrations ("
        " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for found, sql in migration_files():
        if found >= version:
            break
        conn.execute(sql.encode())
        conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (found,))


@contextmanager
def unmigrated_database(admin_url: str) -> Iterator[str]:
    """The URL of a database of its own with no migration applied, dropped after."""
    url = create_database(admin_url, migrated=False)
    try:
        yield url
    finally:
        drop_database(admin_url, url)


@contextmanager
def migrated_across(
    admin_url: str, migration: str, before: str, query: str
) -> Iterator[tuple[str, list[Any]]]:
    """A database as it was before ``migration`` (a version: ``0006_card_ledger``) holding
    the rows the SQL ``before`` writes, then migrated; asserts that the release applied
    ``migration``. Its URL, and the rows ``query`` reads right after."""
    with unmigrated_database(admin_url) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            migrate_before(conn, migration)
            conn.execute(before.encode())

            assert migration in apply_migrations(conn)

            rows: list[Any] = conn.execute(query.encode()).fetchall()
        yield url, rows
