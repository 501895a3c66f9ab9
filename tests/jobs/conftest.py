"""Helpers of the reconciliation job tests: row queries, and the process's pool closed
after each test (``pool`` and ``deliver`` are ``tests/conftest.py``'s)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest


def rows(db: psycopg.Connection[Any], query: str, *params: Any) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in db.execute(query, params or None).fetchall()]


def scalar(db: psycopg.Connection[Any], query: str, *params: Any) -> Any:
    row = db.execute(query, params or None).fetchone()
    assert row is not None, query
    return row[0]


@pytest.fixture(autouse=True)
def _close_job_pool() -> Iterator[None]:
    """``run_job`` opens the process's pool (workers.db); close it after each test."""
    yield
    from workers.db import close_pool

    close_pool()
