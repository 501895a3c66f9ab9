"""Handlers of the card movements: every movement of a card's balance in the ledger, once.

A movement is keyed by its transaction id. The transaction event and the balance event
that describe one movement (a top-up's ``voucher.gift.transaction.created`` and
``voucher.gift.balance_added``) are one entry. A movement of a redemption or its rollback
(``CREDITS_REDEMPTION``, ``POINTS_REFUND``, ...) is the entry the redemption or rollback
webhook makes, keyed by its redemption, whichever arrives first: never counted twice.
Pending points (``pending_points.added`` / ``updated`` / ``canceled``) are not balance and
have no handler (their events are ``ignored``); their activation is a movement.
"""

from __future__ import annotations

from typing import Any

import psycopg

from schemas.card_movement import CardMovementEvent, load_card_movement
from schemas.vocabulary import EFFECT_OF_TRANSACTION
from workers.handlers import sql
from workers.registry import handles

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
    if not event.amount or event.transaction_id is None:
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
        "transaction_id": event.transaction_id,
    }
    if effect is None:
        conn.execute(sql.UPSERT_MOVEMENT, row)
        return
    if event.redemption_id is None:
        # A redemption's movement that does not name its redemption cannot be matched to
        # the redemption's entry: the redemption or rollback webhook, or the transaction
        # event that names it, makes that entry.
        return
    # A transaction naming a stack's parent moved the card of one of its children.
    child = conn.execute(
        sql.CHILD_ON_CARD,
        {"redemption_id": event.redemption_id, "voucher_id": event.voucher_id},
    ).fetchone()
    conn.execute(sql.DELETE_MOVEMENT_OF_TRANSACTION, row)
    conn.execute(
        sql.UPSERT_REDEMPTION_MOVEMENT,
        {**row, "redemption_id": child[0] if child else event.redemption_id, "effect": effect},
    )


def card_moved(event: CardMovementEvent, conn: psycopg.Connection[Any]) -> None:
    if event.voucher_id is None:
        return  # no card named: nothing to attribute the movement to
    record_card(event, conn)
    record_movement(event, conn)
    conn.execute(sql.SYNC_HOLDER, {"voucher_id": event.voucher_id})


for _type in CARD_MOVEMENT_TYPES:
    handles(_type, load_card_movement)(card_moved)

__all__ = ["CARD_MOVEMENT_TYPES", "card_moved"]
