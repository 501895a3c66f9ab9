from __future__ import annotations

import threading
from typing import Any

import psycopg

from migrations import apply_migrations, migration_files
from tests.conftest import create_database, drop_database
from tests.migrations import unmigrated_database


def test_migrations_apply_to_an_empty_database_and_a_second_run_does_nothing(
    postgres_server: str,
) -> None:
    with unmigrated_database(postgres_server) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            first = apply_migrations(conn)
            second = apply_migrations(conn)
            tables = {
                row[0]
                for row in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                )
            }
        assert first == [version for version, _ in migration_files()]
        assert second == []
        assert {"events", "deliveries", "dead_letters", "ledger_entries", "flags"} <= tables


def test_two_release_processes_at_once_apply_each_migration_once(postgres_server: str) -> None:
    url = create_database(postgres_server, migrated=False)
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def release() -> None:
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                results.append(apply_migrations(conn))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=release) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert sorted(len(r) for r in results) == [0, len(migration_files())]
        with psycopg.connect(url) as conn:
            rows: list[Any] = conn.execute("SELECT version FROM schema_migrations").fetchall()
        assert len(rows) == len(migration_files())
    finally:
        drop_database(postgres_server, url)
