"""Stacked redemptions: a parent and one child per redeemable. Rolling back the parent
rolls back every child, restoring each child's card once, whatever the order of the
webhooks and whether a rollback webhook comes for each child too."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from devtools.webhooks import (
    card_redemption,
    card_rollback,
    card_transaction,
    card_transaction_event,
    stack_child,
    stack_parent_redemption,
    stack_parent_rollback,
)
from tests.conftest import deliver

PARENT = "r_stack"
PARENT_ROLLBACK = "rr_stack"
CHILDREN = {"gift": ("r_stack_gift", 1000, 9000), "loyalty": ("r_stack_loyalty", 30, 970)}


def child_redemption(kind: str) -> dict[str, Any]:
    redemption_id, amount, after = CHILDREN[kind]
    data = card_redemption(kind, redemption_id, amount=amount, balance_after=after)
    return stack_child(data, PARENT)


def child_rollback(kind: str) -> dict[str, Any]:
    redemption_id, amount, after = CHILDREN[kind]
    data = card_rollback(kind, redemption_id, f"rr_{redemption_id}", amount, after + amount)
    return stack_child(data, PARENT, PARENT_ROLLBACK)


def parent_redemption() -> dict[str, Any]:
    return stack_parent_redemption(PARENT, 1030, [child for child, _, _ in CHILDREN.values()])


def parent_rollback() -> dict[str, Any]:
    return stack_parent_rollback(PARENT, PARENT_ROLLBACK, 1030)


Step = tuple[str, str, Callable[[], dict[str, Any]]]
STACK: list[Step] = [
    ("ev_child_gift", "redemption.succeeded", lambda: child_redemption("gift")),
    ("ev_child_loyalty", "redemption.succeeded", lambda: child_redemption("loyalty")),
    ("ev_parent", "redemption.succeeded", parent_redemption),
    ("ev_parent_rollback", "redemption.rollback.succeeded", parent_rollback),
]
CHILD_ROLLBACKS: list[Step] = [
    ("ev_child_gift_rb", "redemption.rollback.succeeded", lambda: child_rollback("gift")),
    ("ev_child_loyalty_rb", "redemption.rollback.succeeded", lambda: child_rollback("loyalty")),
]


def apply(pool: ConnectionPool, steps: list[Step]) -> None:
    for event_id, event_type, data in steps:
        assert deliver(pool, event_type, data(), event_id=event_id) in ("processed", "duplicate")


def books(db: psycopg.Connection[Any]) -> tuple[Any, ...]:
    return (
        db.execute("SELECT redemption_id, status FROM redemptions ORDER BY 1").fetchall(),
        db.execute(
            "SELECT redemption_id, effect, amount FROM ledger_entries ORDER BY 1, 2"
        ).fetchall(),
        db.execute("SELECT count(*) FROM flags").fetchone(),
    )


ROLLED_BACK_BOOKS = (
    [
        (PARENT, "ROLLED_BACK"),
        ("r_stack_gift", "ROLLED_BACK"),
        ("r_stack_loyalty", "ROLLED_BACK"),
    ],
    [
        ("r_stack_gift", "debit", -1000),
        ("r_stack_gift", "restore", 1000),
        ("r_stack_loyalty", "debit", -30),
        ("r_stack_loyalty", "restore", 30),
    ],
    (0,),
)


def test_a_parents_rollback_rolls_back_every_child_and_restores_each_card_once(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    apply(pool, STACK)
    assert books(db) == ROLLED_BACK_BOOKS


def test_the_childrens_own_rollback_webhooks_after_it_are_the_same_restores(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    apply(pool, STACK + CHILD_ROLLBACKS)
    assert books(db) == ROLLED_BACK_BOOKS
    # Each child keeps its own rollback's id, from its own webhook.
    assert db.execute(
        "SELECT redemption_id, rollback_id FROM redemptions WHERE redemption_id <> %s ORDER BY 1",
        (PARENT,),
    ).fetchall() == [
        ("r_stack_gift", "rr_r_stack_gift"),
        ("r_stack_loyalty", "rr_r_stack_loyalty"),
    ]


@pytest.mark.parametrize("seed", range(12))
def test_any_order_with_duplicates_and_with_or_without_child_rollbacks_ends_the_same(
    pool: ConnectionPool, db: psycopg.Connection[Any], seed: int
) -> None:
    rng = random.Random(seed)
    steps = STACK + (CHILD_ROLLBACKS if seed % 2 else [])
    steps = steps + rng.sample(steps, 2)  # two duplicates
    rng.shuffle(steps)
    apply(pool, steps)
    assert books(db) == ROLLED_BACK_BOOKS


@pytest.mark.parametrize("transaction_first", [True, False], ids=["transaction first", "after"])
def test_a_card_transaction_naming_the_parent_is_the_childs_entry(
    pool: ConnectionPool, db: psycopg.Connection[Any], transaction_first: bool
) -> None:
    transaction = card_transaction(
        "gift",
        "vtx_stack",
        "CREDITS_REDEMPTION",
        -1000,
        9000,
        "2024-02-01T08:45:32Z",
        redemption_id=PARENT,
    )
    event_type, data = card_transaction_event("gift", transaction)
    steps: list[Step] = [("ev_tx", event_type, lambda: data)]
    child = [STACK[0]]
    apply(pool, steps + child if transaction_first else child + steps)
    assert db.execute(
        "SELECT redemption_id, effect, amount, transaction_id FROM ledger_entries"
    ).fetchall() == [("r_stack_gift", "debit", -1000, "vtx_stack")]
