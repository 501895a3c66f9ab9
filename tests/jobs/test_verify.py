"""Verify against a fake Voucherify on loopback: what the job heals, flags and leaves alone."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from config.settings import Settings
from devtools.webhooks import card_redemption, card_rollback, card_rollback_failed
from tests.conftest import deliver
from tests.jobs.conftest import rows, scalar
from tests.jobs.fake_voucherify import (
    APP_ID,
    APP_TOKEN,
    Failure,
    FakeVoucherify,
    api_redemption,
    api_rollback,
    fake_voucherify,
)
from workers.jobs import run_job
from workers.jobs.verify import VerifyResult, verify
from workers.jobs.verify.job import FLAG_STATES, MISMATCH, RAISE_MISMATCH
from workers.jobs.voucherify_api import RateLimiter, VoucherifyApi, VoucherifyApiError


def hours_ago(hours: int) -> str:
    return (datetime.now(UTC) - timedelta(hours=hours)).isoformat(timespec="milliseconds")


# Recent enough to be within Voucherify's rollback window, old enough to be checked.
REDEEMED = hours_ago(3)
ROLLED = hours_ago(2)


@pytest.fixture
def fake() -> Iterator[FakeVoucherify]:
    with fake_voucherify() as server:
        yield server


class Sleeps:
    """Records the waits instead of waiting."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def api(fake: FakeVoucherify, sleeps: Sleeps) -> VoucherifyApi:
    return VoucherifyApi(fake.url, APP_ID, APP_TOKEN, rate=1000, sleep=sleeps)


def run(pool: ConnectionPool, api: VoucherifyApi) -> VerifyResult:
    return verify(pool, api, after_seconds=60, batch_size=50, deadline=time.monotonic() + 60)


def ledger(db: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return rows(
        db,
        "SELECT redemption_id, effect, amount FROM ledger_entries ORDER BY redemption_id, effect",
    )


def serve_rolled_back(fake: FakeVoucherify, redemption_id: str, rollback_id: str) -> None:
    fake.redemptions[redemption_id] = api_redemption(
        "gift",
        redemption_id,
        2000,
        status="ROLLED_BACK",
        rollback_id=rollback_id,
        date=REDEEMED,
        rollback_date=ROLLED,
    )
    fake.redemptions[rollback_id] = api_rollback(
        "gift", rollback_id, redemption_id, 2000, date=ROLLED
    )


def serve_succeeded(fake: FakeVoucherify, redemption_id: str) -> None:
    fake.redemptions[redemption_id] = api_redemption("gift", redemption_id, 2000, date=REDEEMED)


def redeem(pool: ConnectionPool, redemption_id: str) -> None:
    """Our record of a gift card redemption of 2000, from its webhook."""
    data = card_redemption("gift", redemption_id, 2000, 8000, date=REDEEMED)
    deliver(pool, "redemption.succeeded", data)


def roll_back(pool: ConnectionPool, redemption_id: str, rollback_id: str) -> None:
    """Our record of its rollback, from its webhook."""
    data = card_rollback("gift", redemption_id, rollback_id, 2000, 10000, date=ROLLED)
    deliver(pool, "redemption.rollback.succeeded", data)


def test_a_lost_rollback_webhook_is_applied_from_the_api_once(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    redeem(pool, "r_1")
    serve_rolled_back(fake, "r_1", "rr_1")

    result = run(pool, api)

    assert (result.checked, result.applied, result.mismatches) == (1, 1, 0)
    assert rows(db, "SELECT status, rollback_id FROM redemptions") == [("ROLLED_BACK", "rr_1")]
    assert rows(db, "SELECT status FROM orders") == [("CANCELED",)]
    assert ledger(db) == [("r_1", "debit", -2000), ("r_1", "restore", 2000)]
    assert rows(db, "SELECT status FROM events WHERE event_id LIKE 'verify:%'") == [("processed",)]
    # The webhook arriving late after all changes nothing: the ledger's keys hold.
    roll_back(pool, "r_1", "rr_1")
    assert ledger(db) == [("r_1", "debit", -2000), ("r_1", "restore", 2000)]
    # Harmless twice: ROLLED_BACK with both entries is settled, nothing to check.
    assert run(pool, api) == VerifyResult()
    assert fake.requested("r_1") == 1


def test_a_redemption_voucherify_still_reports_succeeded_is_only_marked_checked(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    redeem(pool, "r_2")
    serve_succeeded(fake, "r_2")

    assert run(pool, api) == VerifyResult(checked=1)
    assert scalar(db, "SELECT verified_at IS NOT NULL FROM redemptions") is True
    assert scalar(db, "SELECT count(*) FROM events") == 1  # no synthetic event
    assert run(pool, api) == VerifyResult()  # checked again only after VERIFY_AFTER_SECONDS


def test_an_already_rolled_back_flag_is_healed_and_resolved_with_a_note(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    # Only the failed rollback reached us; Voucherify rolled the redemption back earlier.
    deliver(pool, "redemption.rollback.failed", card_rollback_failed("r_3", "rrf_3"))
    assert rows(db, "SELECT category, status FROM flags") == [("already_rolled_back", "open")]
    serve_rolled_back(fake, "r_3", "rr_3")

    result = run(pool, api)

    assert (result.applied, result.flags_resolved) == (2, 1)
    assert ledger(db) == [("r_3", "debit", -2000), ("r_3", "restore", 2000)]
    [(status, note)] = rows(db, "SELECT status, note FROM flags")
    assert status == "resolved"
    assert "Voucherify reports the redemption ROLLED_BACK (rollback rr_3)" in note
    assert "restore is in the ledger" in note
    assert run(pool, api) == VerifyResult()


def test_a_review_flag_voucherify_does_not_confirm_stays_open_with_a_note(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    redeem(pool, "r_4")
    deliver(
        pool,
        "redemption.rollback.failed",
        card_rollback_failed("r_4", "rrf_4", code="redemption_too_old"),
    )
    serve_succeeded(fake, "r_4")  # still SUCCEEDED

    result = run(pool, api)

    assert (result.flags_resolved, result.flags_annotated, result.applied) == (0, 1, 0)
    [(category, status, note)] = rows(db, "SELECT category, status, note FROM flags")
    assert (category, status) == ("review", "open")
    assert "Voucherify reports SUCCEEDED; our record: SUCCEEDED" in note


def test_what_cannot_be_made_to_agree_raises_one_mismatch_flag(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    # We recorded a rollback that Voucherify does not know about.
    redeem(pool, "r_5")
    roll_back(pool, "r_5", "rr_5")
    db.execute("DELETE FROM ledger_entries WHERE effect = 'restore'")  # make it unsettled
    serve_succeeded(fake, "r_5")

    assert run(pool, api).mismatches == 1
    db.execute("UPDATE redemptions SET verified_at = now() - interval '1 hour'")
    assert run(pool, api).mismatches == 1  # checked again: the same flag, refreshed

    [(category, code, status, message)] = rows(
        db, "SELECT category, failure_code, status, failure_message FROM flags"
    )
    assert (category, code, status) == ("review", "verify_mismatch", "open")
    assert "our record is ROLLED_BACK, Voucherify's is SUCCEEDED" in message


def test_the_mismatch_flag_is_one_per_redemption_with_a_prepared_statement(
    db: psycopg.Connection[Any],
) -> None:
    # The arbiter's predicate names the partial index's constants: a parameter there makes
    # PostgreSQL find no index once the statement runs on a generic plan.
    db.execute("SET plan_cache_mode = force_generic_plan")
    for message in ("first", "second"):
        db.execute(
            RAISE_MISMATCH,
            {
                **FLAG_STATES,
                "category": "review",
                "id": "r_m",
                "voucher_id": None,
                "mismatch": MISMATCH,
                "message": message,
            },
            prepare=True,
        )
    assert rows(db, "SELECT failure_code, status, failure_message FROM flags") == [
        (MISMATCH, "open", "second")
    ]


def test_429_and_5xx_are_retried_with_backoff_honouring_retry_after(
    pool: ConnectionPool,
    db: psycopg.Connection[Any],
    api: VoucherifyApi,
    fake: FakeVoucherify,
    sleeps: Sleeps,
) -> None:
    redeem(pool, "r_6")
    serve_rolled_back(fake, "r_6", "rr_6")
    fake.fail_first("r_6", Failure(429, {"Retry-After": "7"}), Failure(503))

    result = run(pool, api)

    assert (result.applied, result.errors) == (1, 0)
    assert fake.requested("r_6") == 3
    assert sleeps.calls[0] == 7.0  # Retry-After
    assert 0.25 <= sleeps.calls[1] <= 1.0  # exponential backoff with jitter, 2nd attempt
    assert ledger(db) == [("r_6", "debit", -2000), ("r_6", "restore", 2000)]


def test_an_api_out_of_retries_leaves_the_redemption_for_the_next_run(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    redeem(pool, "r_7")
    serve_rolled_back(fake, "r_7", "rr_7")
    fake.fail_first("r_7", *[Failure(500)] * 5)

    assert run(pool, api).errors == 1
    assert scalar(db, "SELECT verified_at FROM redemptions") is None  # first in line again
    assert run(pool, api).applied == 1


def test_wrong_credentials_stop_the_run(
    pool: ConnectionPool, db: psycopg.Connection[Any], fake: FakeVoucherify, sleeps: Sleeps
) -> None:
    redeem(pool, "r_8")
    wrong = VoucherifyApi(fake.url, APP_ID, "wrong-token", rate=1000, sleep=sleeps)
    with pytest.raises(VoucherifyApiError) as raised:
        run(pool, wrong)
    assert raised.value.status == 401
    assert scalar(db, "SELECT verified_at FROM redemptions") is None


def test_run_job_verifies_with_the_settings_and_the_official_client(
    settings: Settings, db: psycopg.Connection[Any], pool: ConnectionPool, fake: FakeVoucherify
) -> None:
    redeem(pool, "r_9")
    serve_rolled_back(fake, "r_9", "rr_9")
    enabled = dataclasses.replace(
        settings,
        voucherify_api_url=fake.url,
        voucherify_app_id=APP_ID,
        voucherify_app_token=APP_TOKEN,
    )

    answer = run_job("verify", enabled)

    assert answer["status"] == "succeeded"
    assert answer["result"]["applied"] == 1
    assert ledger(db) == [("r_9", "debit", -2000), ("r_9", "restore", 2000)]
    _, headers = fake.requests[0]
    assert (headers["x-app-id"], headers["x-app-token"]) == (APP_ID, APP_TOKEN)
    assert run_job("verify", enabled)["result"]["checked"] == 0


def test_the_rate_limit_spaces_requests() -> None:
    now = [100.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(4, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        limiter.wait()
    assert waits == [0.25, 0.25, 0.25, 0.25]
