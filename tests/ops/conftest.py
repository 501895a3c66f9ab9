"""Fixtures of the ops tests: an app with a token, and a pipeline state made by real processing.

The state is written by ``workers.processing.process_delivery`` itself (the code the
worker runs), on the session's real PostgreSQL, so the ops queries read the rows the
pipeline really writes.
"""

from __future__ import annotations

import dataclasses
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from psycopg_pool import ConnectionPool

from config.settings import Settings
from devtools.fake_voucherify import APP_ID, APP_TOKEN, ROLLBACK_WINDOW_KEY, FakeVoucherify
from devtools.webhooks import (
    body_of,
    card_redemption,
    card_rollback,
    card_rollback_failed,
    envelope,
    fixture,
)
from tests.conftest import PipelineEnv, Processes
from tests.jobs.verify_support import failed_rollback_flag
from web.app import create_app
from workers.db import close_pool
from workers.processing import process_delivery

TOKEN = "ops-test-token-0123456789-abcdefghijklmnop"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(autouse=True)
def _close_process_pool() -> Iterator[None]:
    """The ops views open the process's pool (workers.db) lazily: close it after each test."""
    yield
    close_pool()


@pytest.fixture
def ops_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, ops_api_token=TOKEN)


@pytest.fixture
def app(ops_settings: Settings) -> Flask:
    return create_app(ops_settings)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def deliver(pool: ConnectionPool, document: dict[str, Any], delivery_id: str = "") -> str:
    body = body_of(document).decode()
    outcome = process_delivery(
        pool, body, delivery_id or uuid.uuid4().hex, datetime.now(UTC).isoformat()
    )
    return outcome.status


@dataclass(frozen=True)
class State:
    customer_id: str = "cust_ops"
    order_id: str = "ord_ops_gift"
    redeemed: str = "r_ops_gift"  # redeemed, then rolled back
    rollback_id: str = "rr_ops_gift"
    loyalty: str = "r_ops_loyalty"  # redeemed
    flagged: str = "r_ops_flagged"  # its rollback failed twice (two flags)
    dead_event: str = "ev_ops_bad"
    redeemed_event: str = "ev_ops_red"


@pytest.fixture
def state(pool: ConnectionPool) -> State:
    """Two card redemptions of one customer (one rolled back), three rollback failures
    (three flags), one dead letter, one ignored event, one duplicate delivery."""
    s = State()
    redeemed = envelope(
        "redemption.succeeded",
        card_redemption(
            "gift",
            s.redeemed,
            amount=2000,
            balance_after=8000,
            order_id=s.order_id,
            customer_id=s.customer_id,
        ),
        event_id=s.redeemed_event,
    )
    assert deliver(pool, redeemed, "d_ops_1") == "processed"
    assert deliver(pool, redeemed, "d_ops_2") == "duplicate"
    rolled = envelope(
        "redemption.rollback.succeeded",
        card_rollback(
            "gift",
            s.redeemed,
            s.rollback_id,
            amount=2000,
            balance_after=10000,
            order_id=s.order_id,
            customer_id=s.customer_id,
        ),
        event_id="ev_ops_rb",
    )
    assert deliver(pool, rolled) == "processed"
    loyalty = envelope(
        "redemption.succeeded",
        card_redemption(
            "loyalty",
            s.loyalty,
            amount=300,
            balance_after=700,
            order_id="ord_ops_loyalty",
            customer_id=s.customer_id,
        ),
        event_id="ev_ops_loy",
    )
    assert deliver(pool, loyalty) == "processed"
    for n, code in enumerate(("already_rolled_back", "voucher_disabled", "voucher_disabled")):
        failed = envelope(
            "redemption.rollback.failed",
            card_rollback_failed(s.flagged if n < 2 else "r_ops_other", f"rrf_ops_{n}", code),
            event_id=f"ev_ops_fail_{n}",
        )
        assert deliver(pool, failed) == "processed"
    bad = fixture("redemption.succeeded")
    bad["redemption"]["amount"] = "a lot"
    assert deliver(pool, envelope("redemption.succeeded", bad, event_id=s.dead_event)) == "dead"
    ignored = envelope("voucher.published", {"voucher": {"id": "v_1"}}, event_id="ev_ops_ign")
    assert deliver(pool, ignored) == "ignored"
    return s


@dataclass(frozen=True)
class Site:
    """Real processes on the test's database and Redis, the fake Voucherify API, and
    failed-rollback flags to act on (``failed_rollback_flag``'s: the fake knows the
    redemption and its card)."""

    processes: Processes
    pipeline_env: PipelineEnv
    fake: FakeVoucherify
    pool: ConnectionPool
    db: psycopg.Connection[Any]

    def flag(self, code: str = ROLLBACK_WINDOW_KEY) -> int:
        """A failed-rollback flag: the rollback of r_1 refused with ``code``."""
        return failed_rollback_flag(self.pool, self.db, self.fake, code=code)

    def api_env(self, **more: str) -> dict[str, str]:
        """The processes' environment with the ops token and the fake's API (600 calls a
        minute); ``more`` variables as keywords."""
        return self.pipeline_env(
            OPS_API_TOKEN=TOKEN,
            VOUCHERIFY_API_URL=self.fake.url,
            VOUCHERIFY_APP_ID=APP_ID,
            VOUCHERIFY_APP_TOKEN=APP_TOKEN,
            VOUCHERIFY_API_CALLS_PER_MINUTE="600",
            **more,
        )

    def web(self, **more: str) -> tuple[subprocess.Popen[bytes], int]:
        """A web process on ``api_env(**more)``: it, and its port."""
        return self.processes.web(self.api_env(**more))


@pytest.fixture
def site(
    processes: Processes,
    pipeline_env: PipelineEnv,
    fake: FakeVoucherify,
    pool: ConnectionPool,
    db: psycopg.Connection[Any],
) -> Site:
    return Site(processes, pipeline_env, fake, pool, db)
