"""Card movements in the ledger: once per transaction, signed as the transaction says, the
same entry as the redemption or rollback webhook's, attributed to the card's holder."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from devtools.webhooks import (
    CARD_IDS,
    card_redemption,
    card_rollback,
    card_transaction,
    card_transaction_event,
    fixture,
)
from schemas.card_movement import load_card_movement
from tests.conftest import deliver
from workers.handlers.cards import CARD_MOVEMENT_TYPES

WITH_TRANSACTION = [t for t in CARD_MOVEMENT_TYPES if fixture(t).get("transaction")]
PENDING = (
    "voucher.loyalty_card.pending_points.added",
    "voucher.loyalty_card.pending_points.updated",
    "voucher.loyalty_card.pending_points.canceled",
    "customer.voucher.loyalty_card.pending_points.added",
    "customer.voucher.loyalty_card.pending_points.updated",
    "customer.voucher.loyalty_card.pending_points.canceled",
)


def entries(db: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT voucher_id, customer_id, redeemer_id, kind, effect, amount, redemption_id,"
        " transaction_id, balance_after FROM ledger_entries ORDER BY id"
    ).fetchall()


@pytest.mark.parametrize("event_type", WITH_TRANSACTION)
def test_each_published_card_movement_is_one_entry_of_its_card_and_holder(
    pool: ConnectionPool, db: psycopg.Connection[Any], event_type: str
) -> None:
    data = fixture(event_type)
    expected = load_card_movement("ev", event_type, None, data)
    assert expected.amount
    assert expected.transaction_id
    assert expected.holder_id

    assert deliver(pool, event_type, data) == "processed"
    assert deliver(pool, event_type, data) == "processed"  # another event, same movement

    kind = "gift_credit" if ".gift." in event_type else "loyalty_points"
    assert entries(db) == [
        (
            expected.voucher_id,
            expected.holder_id,
            None,
            kind,
            "movement",
            expected.amount,
            None,
            expected.transaction_id,
            expected.balance_after,
        )
    ]


def test_an_expiry_is_a_debit_and_a_top_up_a_credit() -> None:
    expired = load_card_movement(
        "ev",
        "voucher.loyalty_card.points_expired",
        None,
        fixture("voucher.loyalty_card.points_expired"),
    )
    added = load_card_movement(
        "ev", "voucher.gift.balance_added", None, fixture("voucher.gift.balance_added")
    )
    assert (expired.amount, expired.balance_after) == (-10, 970)
    assert (added.amount, added.balance_after) == (1200, 11500)


@pytest.mark.parametrize("event_type", PENDING)
def test_pending_points_are_not_balance_and_stay_ignored(
    pool: ConnectionPool, db: psycopg.Connection[Any], event_type: str
) -> None:
    assert deliver(pool, event_type, fixture(event_type)) == "ignored"
    assert entries(db) == []


@pytest.mark.parametrize("transaction_first", [True, False], ids=["transaction", "webhook"])
@pytest.mark.parametrize("kind", ["gift", "loyalty"])
def test_a_redemption_and_its_transaction_are_one_debit_whichever_comes_first(
    pool: ConnectionPool, db: psycopg.Connection[Any], kind: str, transaction_first: bool
) -> None:
    redemption = card_redemption(
        kind,
        "r_1",
        400,
        600,
        customer_id="cust_redeemer",
        holder_id="cust_holder",
        date="2024-02-01T08:00:00.000Z",
    )
    ttype = "CREDITS_REDEMPTION" if kind == "gift" else "POINTS_REDEMPTION"
    transaction = card_transaction(
        kind, "vtx_r1", ttype, -400, 600, "2024-02-01T08:00:00.120Z", redemption_id="r_1"
    )
    sends = [
        ("redemption.succeeded", redemption),
        card_transaction_event(kind, transaction, holder_id="cust_holder"),
    ]
    for event_type, data in sends if transaction_first else reversed(sends):
        assert deliver(pool, event_type, data) == "processed"

    ledger_kind = "gift_credit" if kind == "gift" else "loyalty_points"
    assert entries(db) == [
        (
            CARD_IDS[kind],
            "cust_holder",
            "cust_redeemer",
            ledger_kind,
            "debit",
            -400,
            "r_1",
            "vtx_r1",
            600,
        )
    ]
    moved_at = db.execute("SELECT moved_at FROM ledger_entries").fetchone()
    assert moved_at is not None
    assert moved_at[0].isoformat().endswith("08:00:00.120000+00:00")  # the transaction's


@pytest.mark.parametrize("refund_first", [True, False], ids=["refund", "rollback"])
def test_a_rollback_and_its_refund_are_one_restore_whichever_comes_first(
    pool: ConnectionPool, db: psycopg.Connection[Any], refund_first: bool
) -> None:
    assert deliver(pool, "redemption.succeeded", card_redemption("gift", "r_1", 400, 600)) == (
        "processed"
    )
    rollback = card_rollback("gift", "r_1", "rr_1", 400, 1000)
    refund = card_transaction(
        "gift",
        "vtx_rr1",
        "CREDITS_REFUND",
        400,
        1000,
        "2024-02-01T10:23:52.600Z",
        redemption_id="r_1",
        rollback_id="rr_1",
    )
    sends = [("redemption.rollback.succeeded", rollback), card_transaction_event("gift", refund)]
    for event_type, data in sends if refund_first else reversed(sends):
        assert deliver(pool, event_type, data) == "processed"

    assert [(e[4], e[5], e[7]) for e in entries(db)] == [
        ("debit", -400, None),
        ("restore", 400, "vtx_rr1"),
    ]


def test_a_card_redeemed_by_someone_else_moves_its_holders_ledger(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    data = card_redemption("gift", "r_1", 400, 600, customer_id="cust_friend", holder_id="cust_o")
    assert deliver(pool, "redemption.succeeded", data) == "processed"
    assert [(e[1], e[2]) for e in entries(db)] == [("cust_o", "cust_friend")]
    assert db.execute("SELECT customer_id FROM card_balances").fetchall() == [("cust_o",)]


def test_a_redemption_whose_card_snapshot_names_no_holder_takes_data_holder(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    data = card_redemption("gift", "r_h", 400, 600, customer_id="cust_friend", holder_id=None)
    data["holder"] = {"id": "cust_h", "object": "customer"}
    assert deliver(pool, "redemption.succeeded", data) == "processed"
    assert [(e[1], e[2]) for e in entries(db)] == [("cust_h", "cust_friend")]


def test_a_cards_entries_follow_its_holder_as_last_reported(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    early = card_transaction("gift", "vtx_1", "CREDITS_ADDITION", 500, 500, "2024-02-01T08:00:00Z")
    late = card_transaction("gift", "vtx_2", "CREDITS_ADDITION", 100, 600, "2024-02-02T08:00:00Z")
    # The later report (the card now held by cust_new) arrives first.
    assert deliver(pool, *card_transaction_event("gift", late, holder_id="cust_new")) == (
        "processed"
    )
    assert deliver(pool, *card_transaction_event("gift", early, holder_id="cust_old")) == (
        "processed"
    )
    assert [e[1] for e in entries(db)] == ["cust_new", "cust_new"]
