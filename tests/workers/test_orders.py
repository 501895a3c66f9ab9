"""Orders follow Voucherify's order events and the order inside redemption events: the row
holds the latest change by the order's ``updated_at``, whatever the arrival order."""

from __future__ import annotations

import itertools
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from devtools.webhooks import card_redemption, fixture
from devtools.webhooks import order_event as build_order_event
from tests.conftest import deliver
from workers.handlers.orders import ORDER_EVENT_TYPES

ORDER_ID = "ord_lifecycle"


def order_event(
    event_type: str,
    status: str,
    updated_at: str | None,
    amount: int = 10_000,
    created_at: str = "2024-03-12T08:00:00.000Z",
) -> dict[str, Any]:
    """``data`` of a ``customer.order.*`` event: the published example with our order."""
    return build_order_event(event_type, ORDER_ID, status, updated_at, amount, created_at)


def redemption_seeing(status: str, updated_at: str | None) -> dict[str, Any]:
    data = card_redemption("gift", "r_lifecycle", amount=100, balance_after=900, order_id=ORDER_ID)
    data["order"].update(
        {"status": status, "created_at": "2024-03-12T08:00:00.000Z", "updated_at": updated_at}
    )
    return data


def order_row(db: psycopg.Connection[Any]) -> tuple[Any, ...] | None:
    return db.execute(
        "SELECT status, amount, total_amount, last_event_id, last_event_type FROM orders"
        " WHERE order_id = %s",
        (ORDER_ID,),
    ).fetchone()


# The measured case of issue 23: redeemed while CREATED, paid afterwards, then fulfilled.
LIFECYCLE = [
    (
        "ev_o_created",
        "customer.order.created",
        order_event("customer.order.created", "CREATED", None),
    ),
    ("ev_o_redeemed", "redemption.succeeded", redemption_seeing("CREATED", "2024-03-12T08:00:01Z")),
    (
        "ev_o_paid",
        "customer.order.paid",
        order_event("customer.order.paid", "PAID", "2024-03-12T09:00:00Z", amount=9_000),
    ),
    (
        "ev_o_fulfilled",
        "customer.order.updated",
        order_event("customer.order.updated", "FULFILLED", "2024-03-12T10:00:00Z", amount=9_000),
    ),
]
FINAL = ("FULFILLED", 9_000, 9_000, "ev_o_fulfilled", "customer.order.updated")


def test_an_order_redeemed_while_created_then_paid_and_fulfilled_reads_fulfilled(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    outcomes = [deliver(pool, t, data, event_id=e) for e, t, data in LIFECYCLE]
    assert outcomes == ["processed"] * 4
    assert order_row(db) == FINAL
    statuses = db.execute("SELECT type, status FROM events ORDER BY received_at").fetchall()
    assert {s for _, s in statuses} == {"processed"}


@pytest.mark.parametrize("arrival", list(itertools.permutations(range(4))), ids=str)
def test_any_arrival_order_with_duplicates_ends_in_the_latest_change(
    pool: ConnectionPool, db: psycopg.Connection[Any], arrival: tuple[int, ...]
) -> None:
    for index in (*arrival, arrival[0], arrival[-1]):  # two duplicates on top
        event_id, event_type, data = LIFECYCLE[index]
        deliver(pool, event_type, data, event_id=event_id)
    assert order_row(db) == FINAL


def test_any_status_follows_any_status_voucherify_sets(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    sequence = [
        ("CANCELED", "2024-03-12T09:00:00Z"),
        ("PAID", "2024-03-12T10:00:00Z"),  # re-opened: Voucherify has no state machine
        ("CREATED", "2024-03-12T11:00:00Z"),
    ]
    for n, (status, at) in enumerate(sequence):
        deliver(
            pool,
            "customer.order.updated",
            order_event("customer.order.updated", status, at),
            event_id=f"ev_any_{n}",
        )
        assert order_row(db)[0] == status  # type: ignore[index]


def test_a_late_older_change_never_overwrites_a_newer_one(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    newer = order_event("customer.order.canceled", "CANCELED", "2024-03-12T12:00:00Z", amount=1)
    older = order_event("customer.order.paid", "PAID", "2024-03-12T09:00:00Z", amount=2)
    deliver(pool, "customer.order.canceled", newer, event_id="ev_newer")
    deliver(pool, "customer.order.paid", older, event_id="ev_older")
    assert order_row(db) == ("CANCELED", 1, 1, "ev_newer", "customer.order.canceled")


@pytest.mark.parametrize("first", ["PAID", "CANCELED"])
def test_two_changes_at_one_instant_end_in_the_later_status_whichever_comes_first(
    pool: ConnectionPool, db: psycopg.Connection[Any], first: str
) -> None:
    at = "2024-03-12T09:00:00Z"
    changes = {
        "PAID": order_event("customer.order.paid", "PAID", at),
        "CANCELED": order_event("customer.order.canceled", "CANCELED", at),
    }
    second = "CANCELED" if first == "PAID" else "PAID"
    for status in (first, second):
        deliver(pool, "customer.order.updated", changes[status], event_id=f"ev_tie_{status}")
    assert order_row(db)[0] == "CANCELED"  # type: ignore[index]


def test_an_order_without_updated_at_is_dated_by_its_created_at(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    # Created at 08:00 and never updated; a change dated 09:00 that came first stays.
    paid = order_event("customer.order.paid", "PAID", "2024-03-12T09:00:00Z")
    created = order_event("customer.order.created", "CREATED", None)
    deliver(pool, "customer.order.paid", paid, event_id="ev_paid_first")
    deliver(pool, "customer.order.created", created, event_id="ev_created_late")
    assert order_row(db)[0] == "PAID"  # type: ignore[index]
    at = db.execute("SELECT status_at FROM orders").fetchone()
    assert at is not None
    assert at[0].isoformat() == "2024-03-12T09:00:00+00:00"


@pytest.mark.parametrize("event_type", ORDER_EVENT_TYPES)
def test_an_order_event_without_an_order_id_is_dead_lettered_with_the_reason(
    pool: ConnectionPool, db: psycopg.Connection[Any], event_type: str
) -> None:
    data = order_event(event_type, "PAID", None)
    del data["order"]["id"]
    assert deliver(pool, event_type, data) == "dead"
    reason = db.execute("SELECT reason FROM dead_letters").fetchone()
    assert reason is not None
    assert "order" in reason[0]
    assert "id" in reason[0]
    assert db.execute("SELECT count(*) FROM orders").fetchone() == (0,)


@pytest.mark.parametrize("event_type", ORDER_EVENT_TYPES)
def test_each_published_order_event_records_its_order(
    pool: ConnectionPool, db: psycopg.Connection[Any], event_type: str
) -> None:
    data = fixture(event_type)
    assert deliver(pool, event_type, data, event_id="ev_published") == "processed"
    row = db.execute("SELECT order_id, status, amount, customer_id FROM orders").fetchone()
    order = data["order"]
    assert row == (order["id"], order["status"], order["amount"], order["customer_id"])
