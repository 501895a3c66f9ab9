"""Helpers of the reconciliation job tests: row queries, and the process's pool closed
after each test; for the tests that call Voucherify, a clock that sleeps at once and the
client on the fake (``pool``, ``deliver``, ``fake`` and ``fresh_verify_tables`` are
``tests/conftest.py``'s)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from devtools.fake_voucherify import APP_ID, APP_TOKEN, FakeVoucherify
from workers.jobs.voucherify_api import Budget, VoucherifyApi


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


class Clock:
    """Monotonic and wall time that move only when slept: waits are recorded, not waited."""

    def __init__(self) -> None:
        self.mono = time.monotonic()
        self.wall = datetime.now(UTC).timestamp()
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.mono += seconds
        self.wall += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def client(
    pool: ConnectionPool,
    url: str,
    clock: Clock,
    per_minute: int = 6000,
    per_day: int = 100_000,
    token: str = APP_TOKEN,
) -> VoucherifyApi:
    return VoucherifyApi(
        url,
        APP_ID,
        token,
        Budget(pool, per_minute, per_day),
        sleep=clock.sleep,
        clock=clock.monotonic,
        wall_clock=clock.time,
    )


@pytest.fixture
def api(pool: ConnectionPool, fake: FakeVoucherify, clock: Clock) -> VoucherifyApi:
    return client(pool, fake.url, clock)
