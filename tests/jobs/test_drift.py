"""Balance drift: a card's ledger movements against the balance Voucherify reports."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg_pool import ConnectionPool

from devtools.webhooks import (
    CARD_IDS,
    card_balance_event,
    card_redemption,
    card_rollback,
    card_transaction,
    card_transaction_event,
)
from ops import store
from tests.conftest import deliver
from tests.jobs.conftest import rows, scalar
from workers.jobs.drift import RAISE_DRIFT, WORDS, DriftResult, check_drift

GIFT, LOYALTY = CARD_IDS["gift"], CARD_IDS["loyalty"]


def run(pool: ConnectionPool, quiet_seconds: float = 0) -> DriftResult:
    return check_drift(pool, deadline=time.monotonic() + 60, quiet_seconds=quiet_seconds)


def redeem(pool: ConnectionPool, kind: str, rid: str, amount: int, after: int, at: str) -> None:
    data = card_redemption(kind, rid, amount, after, order_id=f"ord_{rid}", date=at)
    assert deliver(pool, "redemption.succeeded", data) == "processed"


def fifty_points_unheard_of(pool: ConnectionPool, later: str = "r_l2") -> None:
    """Two redemptions of the loyalty card: 100 points at 08:00 (balance 900), 50 at 09:00
    as ``later`` (balance 800). Missed: 50 points spent at 08:30 (balance 850)."""
    redeem(pool, "loyalty", "r_l1", 100, 900, "2024-02-01T08:00:00Z")
    redeem(pool, "loyalty", later, 50, 800, "2024-02-01T09:00:00Z")


def move(pool: ConnectionPool, kind: str, tx: str, ttype: str, amount: int, after: int, at: str):
    """A movement of no redemption, by its transaction event."""
    transaction = card_transaction(kind, tx, ttype, amount, after, at)
    event_type, data = card_transaction_event(kind, transaction)
    assert deliver(pool, event_type, data) == "processed"


def drift_flags(db: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return rows(db, "SELECT voucher_id, status FROM flags WHERE category = 'drift' ORDER BY id")


def test_a_card_whose_movements_all_arrived_raises_nothing(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    redeem(pool, "gift", "r_g1", 2000, 8000, "2024-02-01T08:00:00Z")
    redeem(pool, "gift", "r_g2", 1000, 7000, "2024-02-01T09:00:00Z")
    rollback = card_rollback("gift", "r_g2", "rr_g2", 1000, 8000, order_id="ord_r_g2")
    rollback["redemption_rollback"]["date"] = "2024-02-01T10:00:00Z"
    assert deliver(pool, "redemption.rollback.succeeded", rollback) == "processed"

    assert run(pool) == DriftResult(cards=1)
    assert drift_flags(db) == []


def test_top_ups_accruals_and_expiries_are_movements_not_drift(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    move(pool, "loyalty", "vtx_1", "POINTS_ACCRUAL", 100, 100, "2024-02-01T08:00:00Z")
    redeem(pool, "loyalty", "r_l1", 30, 70, "2024-02-01T09:00:00Z")
    move(pool, "loyalty", "vtx_2", "POINTS_EXPIRATION", -20, 50, "2024-02-01T10:00:00Z")
    move(pool, "gift", "vtx_3", "CREDITS_ADDITION", 5000, 5000, "2024-02-01T08:00:00Z")
    redeem(pool, "gift", "r_g1", 1500, 3500, "2024-02-01T09:00:00Z")

    assert run(pool) == DriftResult(cards=2)
    assert drift_flags(db) == []


def test_a_card_that_missed_a_movement_gets_one_flag_naming_the_gap(
    pool: ConnectionPool, db: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    fifty_points_unheard_of(pool)
    redeem(pool, "gift", "r_g1", 2000, 8000, "2024-02-01T08:00:00Z")  # a matching card

    result = run(pool)

    assert (result.cards, result.drifting, result.flags_raised) == (2, 1, 1)
    assert drift_flags(db) == [(LOYALTY, "open")]
    message = scalar(db, "SELECT failure_message FROM flags")
    # The card by its id and the last 4 characters of its code: a code can be spent.
    assert "card \u2026ST-1 (v_loyalty_test)" in message
    assert "LOYALTY-TEST-1" not in message
    assert "Voucherify reports 800" in message
    assert "the ledger implies 850" in message
    assert "difference -50" in message
    assert "LOYALTY-TEST-1" not in caplog.text
    assert [r.voucher_code for r in caplog.records if r.msg == "drift.flagged"] == ["\u2026ST-1"]
    assert (
        REGISTRY.get_sample_value("reconciliation_drifting_cards", {"kind": "loyalty_points"}) == 1
    )
    # Harmless twice: the same open flag, no second one.
    assert run(pool).flags_raised == 0
    assert drift_flags(db) == [(LOYALTY, "open")]


def test_the_missing_webhook_arriving_closes_the_gap_and_the_job_resolves_the_flag(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    fifty_points_unheard_of(pool)
    assert run(pool).flags_raised == 1
    # The missing movement arrives: here its transaction, not its redemption webhook.
    transaction = card_transaction(
        "loyalty",
        "vtx_late",
        "POINTS_REDEMPTION",
        -50,
        850,
        "2024-02-01T08:30:00Z",
        redemption_id="r_l_late",
    )
    event_type, data = card_transaction_event("loyalty", transaction)
    assert deliver(pool, event_type, data) == "processed"

    assert run(pool).flags_resolved == 1

    [(status, note)] = rows(db, "SELECT status, note FROM flags")
    assert status == "resolved"
    assert note.startswith("drift gone")
    assert (
        REGISTRY.get_sample_value("reconciliation_drifting_cards", {"kind": "loyalty_points"}) == 0
    )


def test_a_card_heard_of_within_the_quiet_period_waits_for_a_later_run(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    # A gap while the card is still moving may be a webhook on its way: no flag yet.
    fifty_points_unheard_of(pool)

    assert run(pool, quiet_seconds=3600) == DriftResult(waiting=1)
    assert drift_flags(db) == []
    db.execute("UPDATE card_balances SET heard_at = now() - interval '2 hours'")
    assert run(pool, quiet_seconds=3600).flags_raised == 1


def test_a_gap_a_person_accepted_is_measured_from_then_on(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    redeem(pool, "loyalty", "r_l1", 100, 900, "2024-02-01T08:00:00Z")
    redeem(pool, "loyalty", "r_l2", 50, 1800, "2024-02-01T09:00:00Z")  # 1000 unexplained
    assert run(pool).flags_raised == 1
    db.execute(
        "UPDATE flags SET status = 'resolved', resolved_at = now(),"
        " note = 'top-up of 1000 points by support'"
    )

    assert run(pool) == DriftResult(cards=1, rebased=1)
    redeem(pool, "loyalty", "r_l3", 300, 1500, "2024-02-01T10:00:00Z")
    assert run(pool) == DriftResult(cards=1)
    assert drift_flags(db) == [(LOYALTY, "resolved")]
    # A new gap after that is flagged again, for its own amount.
    redeem(pool, "loyalty", "r_l4", 100, 1300, "2024-02-01T11:00:00Z")
    assert run(pool).flags_raised == 1
    assert "difference -100" in scalar(
        db, "SELECT failure_message FROM flags WHERE status = 'open'"
    )


def test_the_accepted_gap_closed_by_the_late_movement_raises_no_new_flag(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    fifty_points_unheard_of(pool, later="r_l3")  # r_l2 comes late
    assert run(pool).flags_raised == 1
    db.execute("UPDATE flags SET status = 'resolved', resolved_at = now(), note = 'accepted'")
    assert run(pool).rebased == 1
    # The missing movement arrives after all: the books now agree with Voucherify.
    redeem(pool, "loyalty", "r_l2", 50, 850, "2024-02-01T08:30:00Z")

    assert run(pool) == DriftResult(cards=1)
    assert drift_flags(db) == [(LOYALTY, "resolved")]
    assert scalar(db, "SELECT accepted_drift FROM card_balances") == 0


@pytest.mark.parametrize("arrival", ["in order", "reversed"])
def test_two_movements_at_one_instant_are_no_gap_whichever_was_stored_first(
    pool: ConnectionPool, db: psycopg.Connection[Any], arrival: str
) -> None:
    at = "2024-02-01T08:00:00Z"
    movements = [
        ("vtx_a", "CREDITS_ADDITION", 500, 1500),  # 1000 before
        ("vtx_b", "CREDITS_REMOVAL", -200, 1300),
    ]
    for tx, ttype, amount, after in movements if arrival == "in order" else movements[::-1]:
        move(pool, "gift", tx, ttype, amount, after, at)
    move(pool, "gift", "vtx_c", "CREDITS_ADDITION", 100, 1400, "2024-02-01T09:00:00Z")
    move(pool, "gift", "vtx_d", "CREDITS_REMOVAL", -400, 1000, "2024-02-01T10:00:00Z")
    move(pool, "gift", "vtx_e", "CREDITS_ADDITION", 50, 1050, "2024-02-01T10:00:00Z")

    assert run(pool) == DriftResult(cards=1)
    assert drift_flags(db) == []


def test_a_balance_event_and_its_transaction_are_one_movement(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    transaction = card_transaction(
        "gift", "vtx_top", "CREDITS_ADDITION", 1000, 3000, "2024-02-01T08:00:00Z"
    )
    for event_type, data in (
        card_transaction_event("gift", transaction),
        card_balance_event("gift", transaction),
    ):
        assert deliver(pool, event_type, data) == "processed"
    assert rows(db, "SELECT transaction_id, effect, amount, balance_after FROM ledger_entries") == [
        ("vtx_top", "movement", 1000, 3000)
    ]
    assert run(pool) == DriftResult(cards=1)


def test_the_drift_flag_is_one_per_card_with_a_prepared_statement(
    db: psycopg.Connection[Any],
) -> None:
    # The arbiter's predicate names the partial index's constants: a parameter there makes
    # PostgreSQL find no index once the statement runs on a generic plan.
    db.execute("SET plan_cache_mode = force_generic_plan")
    for message in ("first", "second"):
        params = {**WORDS, "voucher_id": GIFT, "message": message}
        db.execute(RAISE_DRIFT, params, prepare=True)
    assert rows(db, "SELECT voucher_id, status, failure_message FROM flags") == [
        (GIFT, "open", "second")
    ]


def test_a_card_heard_of_without_a_balance_has_a_row_and_is_counted_unmeasured(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    # As a redemption verify heals reads: the card in the redemption, no balance report.
    data = card_redemption("gift", "r_unmeasured", 400, 600, order_id="ord_u")
    data["voucher"] = None
    assert deliver(pool, "redemption.succeeded", data) == "processed"
    assert rows(db, "SELECT voucher_id, reported_balance FROM card_balances") == [(GIFT, None)]

    assert run(pool) == DriftResult(unmeasured=1)
    with pool.connection() as conn:
        assert store.unmeasured_cards(conn) == {"gift_credit": 1, "loyalty_points": 0}
    # Its first balance report measures it from then on.
    redeem(pool, "gift", "r_measured", 100, 500, "2024-02-01T09:00:00Z")
    assert rows(db, "SELECT reported_balance FROM card_balances") == [(500,)]
    assert run(pool).unmeasured == 0
