"""One vocabulary: every enum of schemas/vocabulary.py lists exactly the values of the SQL
CHECK constraint on its column, read back from the migrated database."""

from __future__ import annotations

import re
from typing import Any

import psycopg
import pytest

from schemas.vocabulary import CHECKED_COLUMNS, values

CHECKS = """
SELECT c.relname AS table_name, pg_get_constraintdef(k.oid) AS definition
FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
WHERE k.contype = 'c' AND c.relnamespace = 'public'::regnamespace
"""


def check_lists(conn: psycopg.Connection[Any]) -> dict[tuple[str, str], set[str]]:
    found: dict[tuple[str, str], set[str]] = {}
    for table, definition in conn.execute(CHECKS).fetchall():
        # CHECK ((status = ANY (ARRAY['received'::text, ...])))
        match = re.search(r"\(\(?(\w+) = ANY \(ARRAY\[(.*?)\]\)\)", definition)
        if match:
            found[(table, match.group(1))] = set(re.findall(r"'([^']*)'::text", match.group(2)))
    return found


@pytest.mark.parametrize("column", sorted(CHECKED_COLUMNS), ids=lambda c: ".".join(c))
def test_each_enum_is_its_columns_check_list(
    db: psycopg.Connection[Any], column: tuple[str, str]
) -> None:
    checks = check_lists(db)
    assert column in checks, f"no CHECK (... IN ...) on {column}: {sorted(checks)}"
    assert set(values(CHECKED_COLUMNS[column])) == checks[column]


def test_every_check_list_has_its_enum(db: psycopg.Connection[Any]) -> None:
    assert set(check_lists(db)) == set(CHECKED_COLUMNS)
