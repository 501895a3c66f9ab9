"""Balance drift: reported card balances against what the ledger implies."""

from __future__ import annotations

import time
from typing import Any

import psycopg
from prometheus_client import REGISTRY
from psycopg_pool import ConnectionPool

from devtools.webhooks import card_redemption, card_rollback
from tests.conftest import deliver
from tests.jobs.conftest import rows, scalar
from workers.jobs.drift import RAISE_DRIFT, WORDS, DriftResult, check_drift

GIFT = "v_UFAc7FTVO0HtJV2hWZls4O7eqHMyn62g"  # the gift card of devtools.webhooks.gift_voucher
LOYALTY = "v_loyalty_test"


def run(pool: ConnectionPool) -> DriftResult:
    return check_drift(pool, deadline=time.monotonic() + 60)


def redeem(pool: ConnectionPool, kind: str, rid: str, amount: int, after: int, at: str) -> None:
    data = card_redemption(kind, rid, amount, after, order_id=f"ord_{rid}", date=at)
    assert deliver(pool, "redemption.succeeded", data) == "processed"


def drift_flags(db: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return rows(db, "SELECT voucher_id, status FROM flags WHERE category = 'drift' ORDER BY id")


def test_a_card_whose_reports_match_the_ledger_raises_nothing(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    redeem(pool, "gift", "r_g1", 2000, 8000, "2024-02-01T08:00:00Z")  # baseline 8000
    redeem(pool, "gift", "r_g2", 1000, 7000, "2024-02-01T09:00:00Z")
    rollback = card_rollback("gift", "r_g2", "rr_g2", 1000, 8000, order_id="ord_r_g2")
    rollback["redemption_rollback"]["date"] = "2024-02-01T10:00:00Z"
    assert deliver(pool, "redemption.rollback.succeeded", rollback) == "processed"

    assert run(pool) == DriftResult(cards=1)
    assert drift_flags(db) == []


def test_a_card_whose_balance_moved_without_our_ledger_raises_one_flag(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    redeem(pool, "loyalty", "r_l1", 100, 900, "2024-02-01T08:00:00Z")  # baseline 900
    # Voucherify reports 800 after spending 50: 50 points went somewhere our ledger missed.
    redeem(pool, "loyalty", "r_l2", 50, 800, "2024-02-01T09:00:00Z")
    redeem(pool, "gift", "r_g1", 2000, 8000, "2024-02-01T08:00:00Z")  # a matching card

    result = run(pool)

    assert (result.cards, result.drifting, result.flags_raised) == (2, 1, 1)
    assert drift_flags(db) == [(LOYALTY, "open")]
    message = scalar(db, "SELECT failure_message FROM flags")
    assert "Voucherify reports 800" in message
    assert "the ledger implies 850" in message
    assert "difference -50" in message
    assert (
        REGISTRY.get_sample_value("reconciliation_drifting_cards", {"kind": "loyalty_points"}) == 1
    )
    # Harmless twice: the same open flag, no second one.
    assert run(pool).flags_raised == 0
    assert drift_flags(db) == [(LOYALTY, "open")]


def test_a_late_webhook_that_explains_the_drift_resolves_the_flag(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    redeem(pool, "loyalty", "r_l1", 100, 900, "2024-02-01T08:00:00Z")
    redeem(pool, "loyalty", "r_l2", 50, 800, "2024-02-01T09:00:00Z")
    assert run(pool).flags_raised == 1
    # The missing redemption's webhook arrives (re-driven, or verified from the API).
    redeem(pool, "loyalty", "r_l_late", 50, 850, "2024-02-01T08:30:00Z")

    assert run(pool).flags_resolved == 1

    [(status, note)] = rows(db, "SELECT status, note FROM flags")
    assert status == "resolved"
    assert note.startswith("drift gone")
    assert (
        REGISTRY.get_sample_value("reconciliation_drifting_cards", {"kind": "loyalty_points"}) == 0
    )


def test_a_flag_resolved_by_a_person_measures_the_card_from_its_current_report(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    redeem(pool, "loyalty", "r_l1", 100, 900, "2024-02-01T08:00:00Z")
    redeem(pool, "loyalty", "r_l2", 50, 1800, "2024-02-01T09:00:00Z")  # a top-up of 1000
    assert run(pool).flags_raised == 1
    db.execute(
        "UPDATE flags SET status = 'resolved', resolved_at = now(),"
        " note = 'top-up of 1000 points by support'"
    )

    assert run(pool) == DriftResult(cards=1, rebased=1)
    redeem(pool, "loyalty", "r_l3", 300, 1500, "2024-02-01T10:00:00Z")
    assert run(pool) == DriftResult(cards=1)
    assert drift_flags(db) == [(LOYALTY, "resolved")]


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
