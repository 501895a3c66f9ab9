from typing import Any

import psycopg


def test_migrated_database_has_the_inbox(db: psycopg.Connection[Any]) -> None:
    row = db.execute("SELECT count(*) FROM events").fetchone()
    assert row == (0,)
