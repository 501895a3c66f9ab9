"""Failed-rollback flags: the lost rollback gets its own category, verify heals it, the late
webhook resolves it; a rollback is chosen by its result, not by being the newest."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from devtools.fake_voucherify import Failure, FakeVoucherify, api_redemption, api_rollback
from devtools.webhooks import card_rollback_failed
from tests.conftest import deliver
from tests.jobs.conftest import rows
from tests.jobs.verify_support import ledger, redeem, roll_back, run
from workers.jobs.voucherify_api import VoucherifyApi

pytestmark = pytest.mark.usefixtures("fresh_verify_tables")

# Older than the listing's window: these are healed through their flag, by id.
LONG_AGO = "2020-01-01T08:00:00.000Z"
LATER = "2020-01-02T08:00:00.000Z"
LATEST = "2020-01-03T08:00:00.000Z"


def fail_rollback(
    pool: ConnectionPool, redemption_id: str, code: str = "already_rolled_back"
) -> None:
    """The failed rollback's webhook; its payload shows the redemption ROLLED_BACK."""
    deliver(
        pool,
        "redemption.rollback.failed",
        card_rollback_failed(redemption_id, f"rrf_{redemption_id}", code),
    )


def too_old_to_roll_back(pool: ConnectionPool, redemption_id: str) -> None:
    """Our record of a redemption whose rollback Voucherify refused as too old: a flag
    for review."""
    redeem(pool, redemption_id)
    fail_rollback(pool, redemption_id, code="redemption_too_old")


def serve_rolled_back(fake: FakeVoucherify, redemption_id: str) -> None:
    fake.add(
        api_redemption(
            "gift",
            redemption_id,
            2000,
            "ROLLED_BACK",
            f"rr_{redemption_id}",
            date=LONG_AGO,
            rollback_date=LATER,
        ),
        api_rollback("gift", f"rr_{redemption_id}", redemption_id, 2000, date=LATER),
    )


def test_an_already_rolled_back_hiding_a_lost_rollback_gets_its_own_flag_category(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    redeem(pool, "r_lost")  # our record: SUCCEEDED
    fail_rollback(pool, "r_lost")
    fail_rollback(pool, "r_unknown")  # no record at all: the restore is missing too
    redeem(pool, "r_known")
    roll_back(pool, "r_known", "rr_known")  # our record shows the rollback: nothing lost
    fail_rollback(pool, "r_known")

    assert rows(db, "SELECT redemption_id, category, status FROM flags ORDER BY id") == [
        ("r_lost", "lost_rollback", "open"),
        ("r_unknown", "lost_rollback", "open"),
        ("r_known", "already_rolled_back", "open"),
    ]


def test_verify_heals_a_lost_rollback_and_resolves_its_flag(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    redeem(pool, "r_3")
    fail_rollback(pool, "r_3")
    serve_rolled_back(fake, "r_3")

    result = run(pool, api)

    assert (result.checked, result.applied, result.flags_resolved) == (1, 1, 1)
    assert ledger(db) == [("r_3", "debit", -2000), ("r_3", "restore", 2000)]
    [(category, status, note)] = rows(db, "SELECT category, status, note FROM flags")
    assert (category, status) == ("already_rolled_back", "resolved")  # no longer lost
    assert "Voucherify reports the redemption ROLLED_BACK (rollback rr_r_3)" in note
    assert "restore is in the ledger" in note
    assert run(pool, api).checked == 0  # nothing left open


def test_the_lost_rollbacks_late_webhook_ends_the_lost_rollback(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    redeem(pool, "r_4")
    fail_rollback(pool, "r_4")

    roll_back(pool, "r_4", "rr_4")  # Voucherify's retry of the lost webhook, days later

    # What the natural order (rollback, then the failed attempt) leaves: already_rolled_back.
    [(category, status, note)] = rows(db, "SELECT category, status, note FROM flags")
    assert (category, status) == ("already_rolled_back", "open")
    assert "(rollback rr_4): the restore is no longer missing" in note
    # ... which verify resolves like any other, applying nothing.
    fake.add(
        api_redemption("gift", "r_4", 2000, "ROLLED_BACK", "rr_4", date=LONG_AGO),
        api_rollback("gift", "rr_4", "r_4", 2000, date=LATER),
    )
    result = run(pool, api)
    assert (result.applied, result.flags_resolved) == (0, 1)
    assert ledger(db) == [("r_4", "debit", -2000), ("r_4", "restore", 2000)]


def test_the_rollback_applied_is_the_one_that_succeeded_not_the_newest(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    redeem(pool, "r_5")
    fail_rollback(pool, "r_5")
    rollbacks = [{"id": "rr_5", "date": LATER}, {"id": "rrf_5", "date": LATEST}]
    fake.add(
        api_redemption("gift", "r_5", 2000, "ROLLED_BACK", date=LONG_AGO, rollbacks=rollbacks),
        api_rollback("gift", "rr_5", "r_5", 2000, date=LATER),
        api_rollback("gift", "rrf_5", "r_5", 2000, date=LATEST, result="FAILURE"),
    )

    assert run(pool, api).applied == 1
    assert rows(db, "SELECT status, rollback_id FROM redemptions") == [("ROLLED_BACK", "rr_5")]
    assert ledger(db) == [("r_5", "debit", -2000), ("r_5", "restore", 2000)]


def test_a_review_flag_voucherify_does_not_confirm_stays_open_with_a_note(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    too_old_to_roll_back(pool, "r_6")
    fake.add(api_redemption("gift", "r_6", 2000, date=LONG_AGO))  # still SUCCEEDED

    result = run(pool, api)

    assert (result.flags_resolved, result.flags_annotated, result.applied) == (0, 1, 0)
    [(category, status, note)] = rows(db, "SELECT category, status, note FROM flags")
    assert (category, status) == ("review", "open")
    assert "Voucherify reports SUCCEEDED; our record: SUCCEEDED" in note


def test_a_flag_that_does_not_settle_is_checked_ever_less_often(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    too_old_to_roll_back(pool, "r_7")
    fake.add(api_redemption("gift", "r_7", 2000, date=LONG_AGO))  # never settles
    waits = []
    for _ in range(3):
        assert run(pool, api).checked == 1
        [(wait,)] = rows(
            db, "SELECT extract(epoch FROM next_check_at - verified_at)::int FROM flags"
        )
        waits.append(wait)
        db.execute("UPDATE flags SET next_check_at = now(), verified_at = now() - interval '1 s'")
    assert waits == [60, 120, 240]  # VERIFY_AFTER_SECONDS (60 here) x 2^checks
    assert run(pool, api).checked == 1
    assert run(pool, api).checked == 0  # not due: its back-off runs


def test_a_flag_whose_call_keeps_failing_waits_its_back_off_instead_of_coming_first(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    too_old_to_roll_back(pool, "r_8")
    fake.fail_first("r_8", *[Failure(500)] * 5)

    assert run(pool, api).errors == 1
    assert rows(db, "SELECT check_failures, next_check_at > now() FROM flags") == [(1, True)]
    assert run(pool, api).checked == 0  # the next run does not spend its calls on it
