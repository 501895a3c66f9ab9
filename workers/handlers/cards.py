"""Handlers of the card movements: every movement of a card's balance in the ledger, once.

A movement is keyed by its transaction id. The transaction event and the balance event
that describe one movement (a top-up's ``voucher.gift.transaction.created`` and
``voucher.gift.balance_added``) are one entry. A movement of a redemption or its rollback
(``CREDITS_REDEMPTION``, ``POINTS_REFUND``, ...) is the entry the redemption or rollback
webhook makes, keyed by its redemption, whichever arrives first: never counted twice.
Pending points (``pending_points.added`` / ``updated`` / ``canceled``) are not balance and
have no handler (their events are ``ignored``); their activation is a movement.
An earning-rule accrual (``customer.rewarded.loyalty_points``) names no transaction: it is
keyed by card, rule and order (``CardMovementEvent.accrual_key``), and is the same entry as
its ``POINTS_ACCRUAL`` transaction and balance events (``record_accrual``).
"""

from __future__ import annotations

from typing import Any

import psycopg

from schemas.card_movement import CardMovementEvent, load_card_movement
from schemas.vocabulary import EFFECT_OF_TRANSACTION
from workers.handlers import sql
from workers.registry import handles

ACCRUAL = "POINTS_ACCRUAL"

CARD_MOVEMENT_TYPES = (
    "voucher.gift.transaction.created",
    "voucher.loyalty_card.transaction.created",
    "voucher.gift.balance_added",
    "voucher.loyalty_card.points_added",
    "voucher.loyalty_card.points_expired",
    "voucher.loyalty_card.pending_points.activated",
    "customer.voucher.gift.balance_added",
    "customer.voucher.loyalty_card.points_added",
    "customer.voucher.loyalty_card.points_expired",
    "customer.voucher.loyalty_card.pending_points.activated",
    "customer.rewarded.loyalty_points",
)


def record_card(event: CardMovementEvent, conn: psycopg.Connection[Any]) -> None:
    """The card's report: its balance after the movement at the movement's time, its holder."""
    assert event.voucher_id is not None
    reported = event.balance_after is not None and event.moved_at is not None
    conn.execute(
        sql.UPSERT_CARD_BALANCE,
        {
            "voucher_id": event.voucher_id,
            "voucher_code": event.voucher_code,
            "kind": event.kind,
            "customer_id": event.holder_id,
            "balance": event.balance_after if reported else None,
            "at": event.moved_at if reported else None,
        },
    )


def record_movement(event: CardMovementEvent, conn: psycopg.Connection[Any]) -> None:
    """The movement's ledger entry; nothing when the payload cannot say how much moved."""
    if not event.amount or (event.transaction_id is None and event.accrual_key is None):
        return
    effect = EFFECT_OF_TRANSACTION.get(event.transaction_type or "")
    row = {
        **sql.EFFECTS,
        "customer_id": event.holder_id,
        "voucher_id": event.voucher_id,
        "voucher_code": event.voucher_code,
        "kind": event.kind,
        "amount": event.amount,
        "reason": event.reason or "movement",
        "event_id": event.event_id,
        "moved_at": event.moved_at,
        "balance_after": event.balance_after,
        "balance_from_snapshot": event.balance_from_snapshot,
        "transaction_id": event.transaction_id,
        "accrual_key": event.accrual_key,
    }
    if event.accrual_key is not None or event.transaction_type == ACCRUAL:
        record_accrual(row, conn)
        return
    if effect is None:
        conn.execute(sql.UPSERT_MOVEMENT, row)
        return
    if event.redemption_id is None:
        # A redemption's movement that does not name its redemption cannot be matched to
        # the redemption's entry: the redemption or rollback webhook, or the transaction
        # event that names it, makes that entry.
        return
    record_redemption_movement({**row, "effect": effect}, event.redemption_id, conn)


def record_redemption_movement(
    row: dict[str, Any], named: str, conn: psycopg.Connection[Any]
) -> None:
    """A redemption's or rollback's movement: the entry of the redemption it names, or of
    the child on this card of the stack's parent it names; before that child is known, an
    entry waiting for it (``sql.UPSERT_WAITING_MOVEMENT``), never the parent's."""
    keys = {"redemption_id": named, "voucher_id": row["voucher_id"]}
    child = conn.execute(sql.CHILD_ON_CARD, keys).fetchone()
    if child is None and _exists(conn.execute(sql.NAMES_A_PARENT, keys).fetchone()):
        conn.execute(sql.PARENT_ENTRIES_WAIT, keys)  # the other cards' entries keyed by it
        conn.execute(sql.DELETE_OTHER_ENTRIES_OF_TRANSACTION, {**row, "redemption_id": None})
        conn.execute(sql.UPSERT_WAITING_MOVEMENT, {**row, "parent_id": named})
        return
    row = {**row, "redemption_id": child[0] if child else named}
    conn.execute(sql.DELETE_OTHER_ENTRIES_OF_TRANSACTION, row)
    conn.execute(sql.UPSERT_REDEMPTION_MOVEMENT, row)


def _exists(row: Any) -> bool:
    """The answer of a ``SELECT EXISTS (...)``."""
    return bool(row and row[0])


def record_accrual(row: dict[str, Any], conn: psycopg.Connection[Any]) -> None:
    """An earning-rule accrual: one entry for its rewarded event, its transaction and its
    balance event, whichever come and in whatever order (``sql.ACCRUAL_ENTRIES``)."""
    found = conn.execute(sql.ACCRUAL_ENTRIES, row).fetchall()
    exact = [entry for entry in found if entry[3]]
    same = exact or found[:1]
    if not same:
        conn.execute(sql.UPSERT_MOVEMENT, row)
        return
    keep = same[0]  # the one that has its transaction, if one has
    if row["transaction_id"] is not None and keep[1] not in (None, row["transaction_id"]):
        # Another transaction holds this key (one rule, one order, twice): its own entry.
        conn.execute(sql.UPSERT_MOVEMENT, {**row, "accrual_key": None})
        return
    for other in same[1:]:
        if other[1] is None:  # the rewarded half of the movement, now in ``keep``
            conn.execute(sql.DELETE_ENTRY, {"id": other[0]})
    conn.execute(sql.MERGE_ACCRUAL, {**row, "id": keep[0]})


def card_moved(event: CardMovementEvent, conn: psycopg.Connection[Any]) -> None:
    if event.voucher_id is None:
        return  # no card named: nothing to attribute the movement to
    record_card(event, conn)
    record_movement(event, conn)
    conn.execute(sql.SYNC_HOLDER, {"voucher_id": event.voucher_id})


for _type in CARD_MOVEMENT_TYPES:
    handles(_type, load_card_movement)(card_moved)

__all__ = ["CARD_MOVEMENT_TYPES", "card_moved"]
