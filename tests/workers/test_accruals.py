"""Earning-rule accruals (``customer.rewarded.loyalty_points``) in the ledger once, the
same entry as their ``POINTS_ACCRUAL`` transaction when both come, in either order and
however often; and a transaction's own balance report wins over a voucher snapshot."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from devtools.webhooks import (
    CARD_IDS,
    card_balance_event,
    card_transaction,
    card_transaction_event,
    fixture,
)
from tests.conftest import deliver

REWARDED = "customer.rewarded.loyalty_points"
CARD = CARD_IDS["loyalty"]
HOLDER = "cust_card_test"
RULE, ORDER = "ern_test_rule", "ord_test_paid"


def rewarded(points: int = 900, balance: int = 900, order_id: str | None = ORDER) -> dict[str, Any]:
    """The published ``customer.rewarded.loyalty_points``, on the test card."""
    data = copy.deepcopy(fixture(REWARDED))
    data["voucher"].update({"id": CARD, "holder_id": HOLDER})
    data["holder"]["id"] = data["customer"]["id"] = HOLDER
    data["earning_rule"]["id"] = RULE
    data["balance"].update({"points": points, "balance": balance, "total": balance})
    data["balance"]["related_object"]["id"] = CARD
    if order_id is None:
        data["order"] = None
    else:
        data["order"]["id"] = order_id
    return data


def accrual_transaction(points: int = 900, balance: int = 900) -> dict[str, Any]:
    """The ``POINTS_ACCRUAL`` transaction of the same accrual: its details name the earning
    rule and the order (the published ``VoucherTransaction.details``)."""
    transaction = card_transaction(
        "loyalty", "vtx_accrual", "POINTS_ACCRUAL", points, balance, "2024-01-18T15:19:21.000Z"
    )
    transaction["details"].update(
        {
            "earning_rule": {"id": RULE, "source": {"banner": "Order-paid"}},
            "order": {"id": ORDER, "source_id": None},
            "event": {"id": "evcus_0e2905d4db185a04ad", "type": "customer.order.paid"},
        }
    )
    return transaction


def points_added(transaction: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``voucher.loyalty_card.points_added`` of an automatic accrual: as published, its
    transaction's details are null, so it names the transaction but not the rule."""
    event = card_balance_event("loyalty", {**transaction, "type": "POINTS_ADDITION"})
    assert event is not None
    event_type, data = event
    data["transaction"]["type"] = "POINTS_ACCRUAL"
    data["balance"]["operation_type"] = "AUTOMATIC"
    return event_type, data


def entries(db: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT voucher_id, customer_id, effect, amount, transaction_id, balance_after,"
        " moved_at::text FROM ledger_entries ORDER BY id"
    ).fetchall()


def test_an_earning_rule_accrual_alone_is_one_entry_of_the_card_and_its_holder(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    assert deliver(pool, REWARDED, rewarded()) == "processed"
    assert deliver(pool, REWARDED, rewarded()) == "processed"  # a retry: another event id

    [entry] = entries(db)
    assert entry[:6] == (CARD, HOLDER, "movement", 900, None, 900)
    assert db.execute(
        "SELECT reported_balance, customer_id FROM card_balances WHERE voucher_id = %s", (CARD,)
    ).fetchone() == (900, HOLDER)


@pytest.mark.parametrize("order", list(itertools.permutations(["rewarded", "tx", "balance"])))
def test_an_accrual_and_its_transaction_are_one_entry_in_any_order_with_duplicates(
    pool: ConnectionPool, db: psycopg.Connection[Any], order: tuple[str, ...]
) -> None:
    transaction = accrual_transaction()
    sends = {
        "rewarded": (REWARDED, rewarded()),
        "tx": card_transaction_event("loyalty", transaction),
        "balance": points_added(transaction),
    }
    for name in [*order, *order]:
        assert deliver(pool, *sends[name]) == "processed"

    [entry] = entries(db)
    # The transaction's own figures and time, whichever came first.
    assert entry == (CARD, HOLDER, "movement", 900, "vtx_accrual", 900, "2024-01-18 15:19:21+00")


def test_accruals_of_two_orders_by_one_rule_are_two_entries(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    assert deliver(pool, REWARDED, rewarded(900, 900, "ord_1")) == "processed"
    assert deliver(pool, REWARDED, rewarded(100, 1000, "ord_2")) == "processed"

    assert [e[3] for e in entries(db)] == [900, 100]


def test_an_accrual_that_names_neither_order_nor_event_reports_the_card_only(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    data = rewarded(order_id=None)
    data["event"] = None

    assert deliver(pool, REWARDED, data) == "processed"

    assert entries(db) == []  # nothing to key it by: its transaction's webhook makes the entry
    assert db.execute(
        "SELECT reported_balance FROM card_balances WHERE voucher_id = %s", (CARD,)
    ).fetchone() == (900,)


def test_a_transactions_own_balance_replaces_an_anchor_taken_from_a_voucher_snapshot(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    transaction = card_transaction(
        "loyalty", "vtx_expiry", "POINTS_EXPIRATION", -50, 950, "2024-03-01T08:00:00.000Z"
    )
    expiry = card_balance_event("loyalty", transaction)
    assert expiry is not None
    # The expiry event names a count, not a balance: its balance is the voucher's snapshot,
    # here a stale one.
    expiry[1]["voucher"]["loyalty_card"].update({"balance": 1000, "points": 1000})

    assert deliver(pool, *expiry) == "processed"
    assert entries(db)[0][5] == 1000  # only the snapshot so far
    assert deliver(pool, *card_transaction_event("loyalty", transaction)) == "processed"
    assert deliver(pool, *expiry) == "processed"  # a retry of the snapshot changes nothing

    [entry] = entries(db)
    assert entry[3:6] == (-50, "vtx_expiry", 950)


@pytest.mark.parametrize("balance_first", [True, False])
def test_an_accrual_and_its_balance_event_alone_are_one_entry(
    pool: ConnectionPool, db: psycopg.Connection[Any], balance_first: bool
) -> None:
    """Neither names what the other keys by (the rule, the transaction): they are matched
    on the card by the amount and the balance after, and the entry gets both keys."""
    transaction = accrual_transaction()
    sends = [(REWARDED, rewarded()), points_added(transaction)]
    for event_type, data in sends[::-1] if balance_first else sends:
        assert deliver(pool, event_type, data) == "processed"

    [entry] = entries(db)
    assert entry[2:6] == ("movement", 900, "vtx_accrual", 900)
    assert db.execute("SELECT accrual_key FROM ledger_entries").fetchone() == (
        f"{CARD}:{RULE}:order:{ORDER}",
    )
