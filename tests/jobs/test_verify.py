"""Verify against a fake Voucherify on loopback: what the listing heals, flags and leaves alone."""

from __future__ import annotations

import dataclasses
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from config.settings import Settings
from devtools.fake_voucherify import (
    APP_ID,
    APP_TOKEN,
    FakeVoucherify,
    api_failed,
    api_redemption,
    api_rollback,
)
from devtools.webhooks import card_rollback
from tests.conftest import deliver
from tests.jobs.conftest import Clock, client, rows, scalar
from tests.jobs.verify_support import REDEEMED, ROLLED, ago, ledger, redeem, roll_back, run
from workers.jobs import run_job
from workers.jobs.verify import VerifyResult
from workers.jobs.verify.job import FLAG_STATES, MISMATCH, RAISE_MISMATCH
from workers.jobs.voucherify_api import VoucherifyApi, VoucherifyApiError

pytestmark = pytest.mark.usefixtures("fresh_verify_tables")


def rolled_back_unheard(
    pool: ConnectionPool, fake: FakeVoucherify, redemption_id: str, rollback_id: str
) -> None:
    """A gift card redemption of 2000 we recorded, rolled back in Voucherify (its listing
    shows both) and the rollback's webhook lost."""
    redeem(pool, redemption_id)
    fake.add(
        api_redemption("gift", redemption_id, 2000, "ROLLED_BACK", rollback_id, date=REDEEMED),
        api_rollback("gift", rollback_id, redemption_id, 2000, date=ROLLED),
    )


@pytest.mark.parametrize(
    ("kind", "kind_in_ledger"), [("gift", "gift_credit"), ("loyalty", "loyalty_points")]
)
def test_a_lost_card_redemption_is_healed_with_its_debit_from_the_published_shape(
    pool: ConnectionPool,
    db: psycopg.Connection[Any],
    api: VoucherifyApi,
    fake: FakeVoucherify,
    kind: str,
    kind_in_ledger: str,
) -> None:
    # No webhook reached us; Voucherify's answer has no voucher.type, only gift / loyalty_card.
    fake.add(api_redemption(kind, "r_lost", 2000, date=REDEEMED))
    assert "type" not in fake.redemptions["r_lost"]["voucher"]

    result = run(pool, api)

    assert (result.listed, result.applied, result.mismatches, result.calls) == (1, 1, 0, 1)
    assert rows(db, "SELECT status, voucher_type FROM redemptions") == [
        ("SUCCEEDED", "GIFT_VOUCHER" if kind == "gift" else "LOYALTY_CARD")
    ]
    assert rows(db, "SELECT redemption_id, effect, amount, kind FROM ledger_entries") == [
        ("r_lost", "debit", -2000, kind_in_ledger)
    ]
    assert run(pool, api).applied == 0  # listed again (overlap): nothing left to apply


def test_a_lost_rollback_is_healed_from_its_listed_rollback_once(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    rolled_back_unheard(pool, fake, "r_1", "rr_1")

    result = run(pool, api)

    assert (result.listed, result.applied, result.mismatches) == (2, 1, 0)
    assert result.calls == 1  # the redemption was on the same page: no GET of its own
    assert rows(db, "SELECT status, rollback_id FROM redemptions") == [("ROLLED_BACK", "rr_1")]
    assert rows(db, "SELECT status FROM orders") == [("CANCELED",)]
    assert ledger(db) == [("r_1", "debit", -2000), ("r_1", "restore", 2000)]
    # The webhook arriving late after all changes nothing: the ledger's keys hold.
    roll_back(pool, "r_1", "rr_1")
    assert ledger(db) == [("r_1", "debit", -2000), ("r_1", "restore", 2000)]
    assert run(pool, api).applied == 0


def test_a_rollback_listed_without_its_redemption_fetches_the_redemption(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    # The redemption is older than the window; only its rollback is listed.
    redeem(pool, "r_old", date="2020-01-01T00:00:00.000Z")
    fake.add(
        api_redemption(
            "gift", "r_old", 2000, "ROLLED_BACK", "rr_old", date="2020-01-01T00:00:00.000Z"
        ),
        api_rollback("gift", "rr_old", "r_old", 2000, date=ROLLED),
    )

    result = run(pool, api)

    assert (result.listed, result.applied, result.calls) == (1, 1, 2)
    assert fake.requested("r_old") == 1
    assert ledger(db) == [("r_old", "debit", -2000), ("r_old", "restore", 2000)]


def test_a_failed_rollback_in_the_listing_moves_nothing_and_raises_the_webhooks_flag_once(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    redeem(pool, "r_2")
    fake.add(
        api_redemption("gift", "r_2", 2000, date=REDEEMED),
        api_rollback("gift", "rrf_2", "r_2", 2000, date=ROLLED, result="FAILURE"),
    )

    # The redemption.rollback.failed webhook was lost: the listing alone raises its flag.
    first = run(pool, api)
    assert (first.listed, first.applied, first.failed_rollbacks_flagged) == (2, 1, 1)
    assert first.checked == 1  # the new flag, checked after the sweep (one GET)
    assert ledger(db) == [("r_2", "debit", -2000)]
    assert rows(db, "SELECT status FROM redemptions") == [("SUCCEEDED",)]
    assert rows(db, "SELECT category, redemption_id, rollback_id, failure_code FROM flags") == [
        ("already_rolled_back", "r_2", "rrf_2", "already_rolled_back")
    ]
    # Listed again (the overlap): the flag is there, nothing is applied a second time.
    assert run(pool, api).applied == 0
    assert scalar(db, "SELECT count(*) FROM flags") == 1


def test_a_failed_rollback_whose_webhook_came_is_not_applied_again(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    redeem(pool, "r_2")
    failed = card_rollback("gift", "r_2", "rrf_2", 2000, 8000, date=ROLLED)
    failed["redemption_rollback"].update(
        {"status": "FAILED", "failure_code": "already_rolled_back", "failure_message": "x"}
    )
    deliver(pool, "redemption.rollback.failed", failed)
    fake.add(
        api_redemption("gift", "r_2", 2000, date=REDEEMED),
        api_rollback("gift", "rrf_2", "r_2", 2000, date=ROLLED, result="FAILURE"),
    )

    result = run(pool, api)
    assert (result.listed, result.applied, result.failed_rollbacks_flagged) == (2, 0, 0)
    assert scalar(db, "SELECT count(*) FROM flags") == 1


def test_a_listing_with_result_and_no_status_agrees_with_a_rollback_we_recorded(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    # The published listing examples carry result SUCCESS and no status.
    redeem(pool, "r_4")
    roll_back(pool, "r_4", "rr_4")
    listed = api_redemption("gift", "r_4", 2000, "ROLLED_BACK", "rr_4", date=REDEEMED)
    del listed["status"]
    rollback = api_rollback("gift", "rr_4", "r_4", 2000, date=ROLLED)
    del rollback["status"]
    fake.add(listed, rollback)

    result = run(pool, api)

    assert (result.mismatches, result.applied) == (0, 0)
    assert scalar(db, "SELECT count(*) FROM flags") == 0


def test_an_order_change_the_listing_shows_and_we_missed_is_applied_at_no_call(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    redeem(pool, "r_5")  # its order PAID, as the redemption's webhook saw it
    listed = api_redemption("gift", "r_5", 2000, date=REDEEMED)
    # Fulfilled since: the customer.order.updated webhook was lost.
    listed["order"].update({"status": "FULFILLED", "updated_at": ago(hours=1)})
    fake.add(listed)

    result = run(pool, api)

    assert (result.calls, result.applied, result.orders_healed) == (1, 1, 1)
    assert rows(db, "SELECT status, last_event_type FROM orders") == [
        ("FULFILLED", "customer.order.updated")
    ]
    assert run(pool, api).applied == 0  # listed again: the change is ours now


def test_what_agrees_costs_one_page_and_writes_nothing(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    redeem(pool, "r_3")
    fake.add(api_redemption("gift", "r_3", 2000, date=REDEEMED))

    assert run(pool, api) == VerifyResult(listed=1, pages=1, calls=1)
    assert scalar(db, "SELECT count(*) FROM events") == 1  # no synthetic event
    assert scalar(db, "SELECT count(*) FROM flags") == 0


def test_a_failed_redemption_we_never_heard_of_is_recorded(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    fake.add(api_failed("rf_1", REDEEMED))

    assert run(pool, api).applied == 1
    assert rows(db, "SELECT redemption_id, status FROM redemptions") == [("rf_1", "FAILED")]


def test_what_cannot_be_made_to_agree_raises_one_mismatch_flag(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    # We recorded a rollback that Voucherify does not show.
    redeem(pool, "r_5")
    roll_back(pool, "r_5", "rr_5")
    fake.add(api_redemption("gift", "r_5", 2000, date=REDEEMED))

    assert run(pool, api).mismatches == 1
    assert run(pool, api).mismatches == 0  # past the window now, and the flag not due yet
    db.execute("UPDATE flags SET verified_at = now() - interval '1 hour', next_check_at = now()")
    again = run(pool, api)  # the flag checked again, by id: the same flag, refreshed
    assert (again.checked, again.mismatches) == (1, 1)

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
                "recheck_after": 3600,
            },
            prepare=True,
        )
    assert rows(db, "SELECT failure_code, status, failure_message FROM flags") == [
        (MISMATCH, "open", "second")
    ]


def test_wrong_credentials_stop_the_run(
    pool: ConnectionPool, db: psycopg.Connection[Any], fake: FakeVoucherify, clock: Clock
) -> None:
    fake.add(api_redemption("gift", "r_8", 2000, date=REDEEMED))
    wrong = client(pool, fake.url, clock, token="wrong-token")
    with pytest.raises(VoucherifyApiError) as raised:
        run(pool, wrong)
    assert raised.value.status == 401
    assert scalar(db, "SELECT count(*) FROM redemptions") == 0
    assert scalar(db, "SELECT count(*) FROM verify_watermarks") == 0


def test_run_job_verifies_with_the_settings_and_the_budget(
    settings: Settings, db: psycopg.Connection[Any], pool: ConnectionPool, fake: FakeVoucherify
) -> None:
    rolled_back_unheard(pool, fake, "r_9", "rr_9")
    enabled = dataclasses.replace(
        settings,
        voucherify_api_url=fake.url,
        voucherify_app_id=APP_ID,
        voucherify_app_token=APP_TOKEN,
        verify_after_seconds=60,
    )

    answer = run_job("verify", enabled)

    assert answer["status"] == "succeeded"
    assert (answer["result"]["applied"], answer["result"]["calls"]) == (1, 1)
    assert ledger(db) == [("r_9", "debit", -2000), ("r_9", "restore", 2000)]
    _, headers = fake.requests[0]
    assert (headers["x-app-id"], headers["x-app-token"]) == (APP_ID, APP_TOKEN)
    assert scalar(db, "SELECT calls FROM voucherify_api_calls WHERE period = 'day'") == 1
    assert run_job("verify", enabled)["result"]["applied"] == 0
