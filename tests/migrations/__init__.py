"""The migration tests; ``migrate_before`` makes a database as it was before a migration."""

from __future__ import annotations

from typing import Any

import psycopg

from migrations import migration_files


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
