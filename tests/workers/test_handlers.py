"""The redemption-family handlers against PostgreSQL: the rows each event leaves behind."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg_pool import ConnectionPool

from devtools.webhooks import (
    CARD_IDS,
    SEEDS,
    card_redemption,
    card_rollback,
    card_rollback_failed,
    card_transaction,
    card_transaction_event,
    fixture,
)
from tests.conftest import deliver


def one(db: psycopg.Connection[Any], query: str, *params: Any) -> tuple[Any, ...]:
    row = db.execute(query, params).fetchone()
    assert row is not None, query
    return tuple(row)


def ledger(db: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return [
        tuple(r)
        for r in db.execute(
            "SELECT redemption_id, kind, effect, amount, customer_id, voucher_code"
            " FROM ledger_entries ORDER BY redemption_id, effect"
        ).fetchall()
    ]


# --- the published examples -----------------------------------------------------------


def test_redemption_succeeded_records_the_redemption_and_its_order(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    assert deliver(pool, "redemption.succeeded", fixture("redemption.succeeded")) == "processed"
    assert one(
        db,
        "SELECT status, order_id, customer_id, voucher_code, voucher_type FROM redemptions",
    ) == (
        "SUCCEEDED",
        "ord_3VYCHwdV0YOOch2nm1RsTKNI",
        "cust_1g637SqVZnkdPNdAIZ7Ra879",
        "Always-add-prods-5",
        "DISCOUNT_VOUCHER",
    )
    assert one(db, "SELECT status, amount, total_amount, customer_id FROM orders") == (
        "PAID",
        7000,
        6000,
        "cust_1g637SqVZnkdPNdAIZ7Ra879",
    )
    assert ledger(db) == []  # a discount coupon moves no balance


def test_redemption_failed_is_recorded_with_its_failure_code_and_no_ledger_effect(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    assert deliver(pool, "redemption.failed", fixture("redemption.failed")) == "processed"
    assert one(db, "SELECT redemption_id, status, failure_code FROM redemptions") == (
        "rf_0e3ac5685ba431c104",
        "FAILED",
        "no_applicable_redeemables",
    )
    assert ledger(db) == []


def test_rollback_succeeded_marks_the_redemption_rolled_back_and_cancels_the_order(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    data = fixture("redemption.rollback.succeeded")
    assert deliver(pool, "redemption.rollback.succeeded", data) == "processed"
    assert one(
        db, "SELECT redemption_id, status, rollback_id, rollback_reason FROM redemptions"
    ) == (
        "r_0e3ab1f3fb99fee4b9",
        "ROLLED_BACK",
        "rr_0e3ac8762299fef1e3",
        "Fraud prevention",
    )
    assert one(db, "SELECT order_id, status FROM orders") == (
        "ord_OPBS4bwowjzQ3odiMNk09WPL",
        "CANCELED",
    )


@pytest.mark.parametrize(
    ("event_types", "redemption", "order"),
    [
        pytest.param(
            ["customer.redemption.succeeded"],
            ("SUCCEEDED", "ord_p6B1A0y805yUQQaCw4bC6Fbk", None),
            ("PAID", 11499, 10349),
            id="succeeded-like-redemption-succeeded",
        ),
        pytest.param(
            ["customer.redemption.succeeded", "customer.redemption.rollback.succeeded"],
            ("ROLLED_BACK", "ord_p6B1A0y805yUQQaCw4bC6Fbk", "rr_0e70cac29fee95aa7b"),
            # The rollback's order snapshot has no discount: amounts come from the newest one.
            ("CANCELED", 11499, 11499),
            id="then-its-rollback-ends-rolled-back-and-canceled",
        ),
    ],
)
def test_customer_redemption_events_behave_like_the_redemption_ones(
    pool: ConnectionPool,
    db: psycopg.Connection[Any],
    event_types: list[str],
    redemption: tuple[Any, ...],
    order: tuple[Any, ...],
) -> None:
    for event_type in event_types:
        assert deliver(pool, event_type, fixture(event_type)) == "processed"
    assert one(db, "SELECT status, order_id, rollback_id FROM redemptions") == redemption
    assert one(db, "SELECT status, amount, total_amount FROM orders") == order


def test_rollback_failed_raises_one_lost_rollback_flag_and_restores_nothing(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    # already_rolled_back, the payload shows ROLLED_BACK, we have no record of the rollback:
    # its webhook was lost (the verify job heals it; see tests/jobs/test_verify_flags.py).
    data = fixture("redemption.rollback.failed")
    assert deliver(pool, "redemption.rollback.failed", data) == "processed"
    # A second event about the same failed rollback (another event id) adds no flag.
    assert deliver(pool, "redemption.rollback.failed", data) == "processed"
    assert one(
        db,
        "SELECT category, redemption_id, rollback_id, failure_code, failure_message, status"
        " FROM flags",
    ) == (
        "lost_rollback",
        "r_0e3ab1f3fb99fee4b9",
        "rrf_0e3ac8beeea431c302",
        "already_rolled_back",
        "Already rolled back",
        "open",
    )
    assert one(db, "SELECT count(*) FROM flags") == (1,)
    assert ledger(db) == []
    assert one(db, "SELECT count(*) FROM redemptions") == (0,)


def test_a_rollback_failed_with_another_code_needs_review(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    data = card_rollback_failed("r_old", "rrf_old", code="redemption_too_old")
    deliver(pool, "redemption.rollback.failed", data)
    assert one(db, "SELECT category, failure_code FROM flags") == ("review", "redemption_too_old")


@pytest.mark.parametrize("refund_first", [True, False], ids=["refund first", "refund after"])
def test_a_refund_transaction_that_restored_the_card_is_no_lost_rollback(
    pool: ConnectionPool, db: psycopg.Connection[Any], refund_first: bool
) -> None:
    # The rollback's webhook is lost, but the card's refund transaction says it happened.
    deliver(pool, "redemption.succeeded", card_redemption("gift", "r_rf", 400, 600))
    refund = card_transaction(
        "gift",
        "vtx_rf",
        "CREDITS_REFUND",
        400,
        1000,
        "2024-02-01T10:23:52Z",
        redemption_id="r_rf",
        rollback_id="rr_rf",
    )
    failed = card_rollback_failed("r_rf", "rrf_rf", voucher_id=CARD_IDS["gift"])
    steps = [
        lambda: deliver(pool, *card_transaction_event("gift", refund)),
        lambda: deliver(pool, "redemption.rollback.failed", failed),
    ]
    for step in steps if refund_first else steps[::-1]:
        assert step() == "processed"
    assert one(db, "SELECT category, status FROM flags") == ("already_rolled_back", "open")
    entries = [(r, effect, amount) for r, _, effect, amount, _, _ in ledger(db)]
    assert entries == [("r_rf", "debit", -400), ("r_rf", "restore", 400)]


@pytest.mark.parametrize("success_first", [True, False], ids=["success first", "failure first"])
def test_a_review_flag_is_resolved_by_a_successful_rollback_in_either_order(
    pool: ConnectionPool, db: psycopg.Connection[Any], success_first: bool
) -> None:
    deliver(pool, "redemption.succeeded", card_redemption("gift", "r_rv", 400, 600))
    failed = card_rollback_failed("r_rv", "rrf_rv", code="internal_error")
    rolled = card_rollback("gift", "r_rv", "rr_rv", 400, 1000)
    steps = [
        lambda: deliver(pool, "redemption.rollback.succeeded", rolled),
        lambda: deliver(pool, "redemption.rollback.failed", failed),
    ]
    for step in steps if success_first else steps[::-1]:
        assert step() == "processed"
    category, status, note = one(db, "SELECT category, status, note FROM flags")
    assert (category, status) == ("review", "resolved")
    assert "rr_rv" in note


SEED_WEBHOOKS = sorted(p for p in SEEDS.glob("0*.json") if ".api." not in p.name)


@pytest.mark.parametrize("path", SEED_WEBHOOKS, ids=lambda p: p.name)
def test_each_seed_webhook_payload_goes_through_its_handler(
    pool: ConnectionPool, db: psycopg.Connection[Any], path: Any
) -> None:
    event_type = path.name.split(".", 1)[1].removesuffix(".json")
    data = json.loads(path.read_text())
    assert deliver(pool, event_type, data) == "processed"
    redemption_id = data["redemption"]["id"]
    if event_type == "redemption.rollback.failed":
        assert one(db, "SELECT redemption_id, category FROM flags") == (
            redemption_id,
            "lost_rollback",  # the payload says ROLLED_BACK; we have no record of it
        )
    else:
        expected = "ROLLED_BACK" if "rollback" in event_type else "SUCCEEDED"
        assert one(db, "SELECT redemption_id, status FROM redemptions") == (
            redemption_id,
            expected,
        )


# --- gift cards and loyalty cards ------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "ledger_kind", "spent"),
    [("gift", "gift_credit", 2000), ("loyalty", "loyalty_points", 40)],
)
def test_a_card_redemption_debits_and_its_rollback_restores_exactly_once(
    pool: ConnectionPool, db: psycopg.Connection[Any], kind: str, ledger_kind: str, spent: int
) -> None:
    redeemed = card_redemption(kind, "r_card", amount=spent, balance_after=10000 - spent)
    rolled = card_rollback(kind, "r_card", "rr_card", amount=spent, balance_after=10000)
    deliver(pool, "redemption.succeeded", redeemed, event_id="ev_a")
    deliver(pool, "redemption.succeeded", redeemed, event_id="ev_a")  # duplicate delivery
    deliver(pool, "customer.redemption.succeeded", redeemed)  # the distribution's copy
    assert [row[:4] for row in ledger(db)] == [("r_card", ledger_kind, "debit", -spent)]

    deliver(pool, "redemption.rollback.succeeded", rolled, event_id="ev_b")
    deliver(pool, "customer.redemption.rollback.succeeded", rolled)
    assert [row[:4] for row in ledger(db)] == [
        ("r_card", ledger_kind, "debit", -spent),
        ("r_card", ledger_kind, "restore", spent),
    ]
    assert ledger(db)[0][4] == "cust_card_test"
    assert one(db, "SELECT status, amount FROM redemptions") == ("ROLLED_BACK", spent)
    assert one(db, "SELECT kind, reported_balance FROM card_balances") == (ledger_kind, 10000)


def test_a_rollback_before_its_redemption_ends_with_the_same_entries(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    redeemed = card_redemption("gift", "r_late", amount=2500, balance_after=7500)
    rolled = card_rollback("gift", "r_late", "rr_late", amount=2500, balance_after=10000)
    deliver(pool, "redemption.rollback.succeeded", rolled)
    deliver(pool, "redemption.succeeded", redeemed)
    assert [row[:4] for row in ledger(db)] == [
        ("r_late", "gift_credit", "debit", -2500),
        ("r_late", "gift_credit", "restore", 2500),
    ]
    # A late redemption.succeeded never turns the rollback back, nor the canceled order.
    assert one(db, "SELECT status FROM redemptions") == ("ROLLED_BACK",)
    assert one(db, "SELECT status FROM orders") == ("CANCELED",)
    # The balance reported last (by date) wins, whatever the arrival order.
    assert one(db, "SELECT reported_balance FROM card_balances") == (10000,)


def test_a_rollback_without_an_amount_restores_what_was_debited_in_either_order(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    for first_rollback, rid in ((False, "r_na1"), (True, "r_na2")):
        redeemed = card_redemption("loyalty", rid, amount=75, balance_after=925)
        rolled = card_rollback(
            "loyalty", rid, f"rr_{rid}", amount=75, balance_after=1000, include_amount=False
        )
        rolled["redemption"].pop("amount", None)
        events = [("redemption.succeeded", redeemed), ("redemption.rollback.succeeded", rolled)]
        for event_type, data in reversed(events) if first_rollback else events:
            deliver(pool, event_type, data)
        entries = [row[:4] for row in ledger(db) if row[0] == rid]
        assert entries == [
            (rid, "loyalty_points", "debit", -75),
            (rid, "loyalty_points", "restore", 75),
        ]


def test_a_stack_counts_each_card_once_and_the_stack_itself_not_at_all(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    """One webhook per redeemable plus one for the stack: only the cards move balances."""
    gift = card_redemption("gift", "r_child_gift", amount=1000, balance_after=9000)
    loyalty = card_redemption("loyalty", "r_child_loyalty", amount=30, balance_after=970)
    for child in (gift, loyalty):
        child["redemption"]["redemption"] = "r_stack_parent"
    stack = fixture("redemption.succeeded")
    stack["voucher"] = None
    stack["redemption"].update(
        {"id": "r_stack_parent", "amount": 1030, "object": "redemption", "voucher": None}
    )
    for event_type, data in (
        ("redemption.succeeded", gift),
        ("redemption.succeeded", loyalty),
        ("redemption.succeeded", stack),
    ):
        deliver(pool, event_type, data)
    assert [row[:4] for row in ledger(db)] == [
        ("r_child_gift", "gift_credit", "debit", -1000),
        ("r_child_loyalty", "loyalty_points", "debit", -30),
    ]
    parents = db.execute(
        "SELECT redemption_id, parent_redemption_id FROM redemptions ORDER BY 1"
    ).fetchall()
    assert parents == [
        ("r_child_gift", "r_stack_parent"),
        ("r_child_loyalty", "r_stack_parent"),
        ("r_stack_parent", None),
    ]


# --- any interleaving, any duplication ------------------------------------------------


def _final_state(db: psycopg.Connection[Any]) -> tuple[Any, ...]:
    return (
        db.execute(
            "SELECT redemption_id, status, rollback_id FROM redemptions ORDER BY 1"
        ).fetchall(),
        db.execute("SELECT order_id, status FROM orders ORDER BY 1").fetchall(),
        db.execute(
            "SELECT customer_id, kind, sum(amount) FROM ledger_entries GROUP BY 1, 2 ORDER BY 1, 2"
        ).fetchall(),
        db.execute("SELECT rollback_id, category, status FROM flags ORDER BY 1").fetchall(),
        db.execute("SELECT voucher_id, reported_balance FROM card_balances ORDER BY 1").fetchall(),
    )


def _story(kind: str) -> list[tuple[str, str, dict[str, Any]]]:
    """A card redemption's events in their natural order, each with a fixed event id."""
    spent = 2000 if kind == "gift" else 50
    return [
        (
            "ev_succeeded",
            "redemption.succeeded",
            card_redemption(kind, "r_story", amount=spent, balance_after=10000 - spent),
        ),
        (
            "ev_rolled_back",
            "redemption.rollback.succeeded",
            card_rollback(kind, "r_story", "rr_story", amount=spent, balance_after=10000),
        ),
        (
            "ev_rollback_failed",
            "redemption.rollback.failed",
            card_rollback_failed("r_story", "rrf_story"),
        ),
    ]


def _reset(db: psycopg.Connection[Any]) -> None:
    db.execute(
        "TRUNCATE events, deliveries, dead_letters, orders, redemptions, ledger_entries,"
        " card_balances, flags RESTART IDENTITY CASCADE"
    )


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    kind=st.sampled_from(["gift", "loyalty"]),
    order=st.permutations(range(3)),
    extra=st.lists(st.integers(min_value=0, max_value=2), max_size=4),
)
def test_any_interleaving_and_duplication_ends_as_the_natural_order(
    pool: ConnectionPool,
    db: psycopg.Connection[Any],
    kind: str,
    order: list[int],
    extra: list[int],
) -> None:
    story = _story(kind)
    _reset(db)
    for event_id, event_type, data in story:
        deliver(pool, event_type, data, event_id=event_id)
    natural = _final_state(db)

    _reset(db)
    for index in [*order, *extra]:
        event_id, event_type, data = story[index]
        deliver(pool, event_type, data, event_id=event_id)
    assert _final_state(db) == natural
    # and the natural order is what the business expects: debit and restore cancel out
    assert [row[2] for row in natural[2]] == [0]
    assert natural[0][0][1] == "ROLLED_BACK"
