"""Fixtures of the reconciliation job tests: a pool on the test database, a delivery helper."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from devtools.webhooks import body_of, envelope
from workers.processing import process_delivery


@pytest.fixture
def pool(database_url: str) -> Iterator[ConnectionPool]:
    with ConnectionPool(database_url, min_size=1, max_size=4, open=True) as pool:
        yield pool


def deliver(
    pool: ConnectionPool,
    event_type: str,
    data: Any,
    event_id: str | None = None,
    received_at: str | None = None,
) -> str:
    """Apply one webhook as the worker would; the outcome's status."""
    doc = envelope(event_type, data, event_id=event_id)
    return process_delivery(
        pool,
        body_of(doc).decode(),
        uuid.uuid4().hex,
        received_at or datetime.now(UTC).isoformat(),
    ).status


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
