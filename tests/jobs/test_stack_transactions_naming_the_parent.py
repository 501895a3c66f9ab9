"""A stack's card transaction naming the parent, heard of before the child that moved the
card, waits for that child (keyed by its transaction, ``stack_parent_id``) and is the
child's entry once the child is heard of: never the parent's, never another card's.
Shrunk from the card-ledger property (tests/jobs/test_card_ledger_property.py), where both
were bugs:

1. Two cards' transactions naming the parent before the children were both keyed
   (parent, effect): one entry, the second overwriting the first one's amount and
   transaction; the gift child then took it, and the gift card's ledger was 970 off.
2. The parent's redemption webhook after its rollback mirrored a child's debit keyed by
   the parent into a restore keyed by the parent: with the child's own refund, the card
   was restored twice (+30 off Voucherify's balance).
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from devtools.webhooks import CARD_IDS, card_transaction, card_transaction_event
from tests.conftest import deliver
from tests.workers.test_stacks import (
    CHILDREN,
    PARENT,
    PARENT_ROLLBACK,
    child_redemption,
    child_rollback,
    parent_redemption,
    parent_rollback,
)

MOVES = {
    "debit": {"gift": "CREDITS_REDEMPTION", "loyalty": "POINTS_REDEMPTION"},
    "restore": {"gift": "CREDITS_REFUND", "loyalty": "POINTS_REFUND"},
}


def _transaction_naming_the_parent(kind: str, effect: str) -> tuple[str, dict[str, Any]]:
    _, amount, after = CHILDREN[kind]
    signed, balance = (-amount, after) if effect == "debit" else (amount, after + amount)
    transaction = card_transaction(
        kind,
        f"vtx_{effect}_{kind}",
        MOVES[effect][kind],
        signed,
        balance,
        "2024-02-01T10:23:52.600Z" if effect == "restore" else "2024-02-01T08:45:32.100Z",
        redemption_id=PARENT,
        rollback_id=PARENT_ROLLBACK if effect == "restore" else None,
    )
    return card_transaction_event(kind, transaction)


@pytest.mark.parametrize("effect", ["debit", "restore"])
def test_both_cards_transactions_naming_the_parent_before_the_children_are_each_childs_entry(
    pool: ConnectionPool, db: psycopg.Connection[Any], effect: str
) -> None:
    # What was sent, in this order: the gift card's and the loyalty card's transactions of
    # the stack (each naming the parent), then the children's redemption webhooks (and for
    # the restores, the children's rollback webhooks after the redemptions).
    for kind in ("gift", "loyalty"):
        event_type, data = _transaction_naming_the_parent(kind, effect)
        assert deliver(pool, event_type, data, event_id=f"ev_tx_{kind}") == "processed"
    # Until the children are heard of, each card's entry waits for its child.
    waiting = db.execute(
        "SELECT voucher_id, redemption_id, stack_parent_id FROM ledger_entries ORDER BY 1"
    ).fetchall()
    assert waiting == [(card, None, PARENT) for card in sorted(CARD_IDS.values())]
    for kind in ("gift", "loyalty"):
        deliver(pool, "redemption.succeeded", child_redemption(kind), event_id=f"ev_r_{kind}")
        if effect == "restore":
            deliver(pool, "redemption.rollback.succeeded", child_rollback(kind))

    entries = db.execute(
        "SELECT redemption_id, voucher_id, amount, transaction_id FROM ledger_entries"
        " WHERE effect = %s ORDER BY 1",
        (effect,),
    ).fetchall()
    sign = -1 if effect == "debit" else 1
    # Each child's entry on its own card, with its own transaction and amount.
    assert entries == [
        ("r_stack_gift", CARD_IDS["gift"], sign * 1000, f"vtx_{effect}_gift"),
        ("r_stack_loyalty", CARD_IDS["loyalty"], sign * 30, f"vtx_{effect}_loyalty"),
    ]


def test_a_parents_late_redemption_restores_no_childs_debit_that_names_the_parent(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    # What was sent, in this order (the stack: its parent and one loyalty child of 30).
    debit = card_transaction(
        "loyalty",
        "vtx_debit",
        "POINTS_REDEMPTION",
        -30,
        970,
        "2024-02-01T08:45:32.100Z",
        redemption_id=PARENT,  # names the parent
    )
    refund = card_transaction(
        "loyalty",
        "vtx_refund",
        "POINTS_REFUND",
        30,
        1000,
        "2024-02-01T10:23:52.600Z",
        redemption_id="r_stack_loyalty",  # names the child
        rollback_id="rr_r_stack_loyalty",
    )
    steps = [
        ("redemption.rollback.succeeded", parent_rollback()),
        card_transaction_event("loyalty", debit),
        ("redemption.succeeded", parent_redemption()),  # -> a restore of (parent, 30)
        card_transaction_event("loyalty", refund),  # -> the child's restore
        ("redemption.succeeded", child_redemption("loyalty")),  # takes the parent's debit
    ]
    for n, (event_type, data) in enumerate(steps):
        assert deliver(pool, event_type, data, event_id=f"ev_{n}") == "processed"

    entries = db.execute(
        "SELECT redemption_id, effect, amount FROM ledger_entries ORDER BY 1, 2"
    ).fetchall()
    # The child's debit and its one restore, 0 in all, as Voucherify's 1000 after the
    # refund says; no restore keyed by the parent.
    assert entries == [
        ("r_stack_loyalty", "debit", -30),
        ("r_stack_loyalty", "restore", 30),
    ]
