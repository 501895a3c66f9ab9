"""Handlers of the redemption family: orders, redemptions, ledger, card balances, flags.

Every effect is an idempotent statement guarded by a key or an allowed transition, so
any number of deliveries in any order ends in the same rows as the natural order.
"""

from __future__ import annotations

import logging
from datetime import datetime
from functools import partial
from typing import Any

import psycopg

from schemas.redemption import Redemption, RedemptionEvent, load_redemption_event
from schemas.vocabulary import FlagCategory, LedgerEffect, RedemptionStatus
from workers.handlers import sql
from workers.handlers.orders import record_order
from workers.registry import handles

log = logging.getLogger(__name__)

load_redemption = partial(load_redemption_event, rollback=False)
load_rollback = partial(load_redemption_event, rollback=True)


def _when(*candidates: datetime | None) -> datetime | None:
    return next((c for c in candidates if c is not None), None)


def _record_order(
    event: RedemptionEvent, conn: psycopg.Connection[Any], at: datetime | None
) -> None:
    record_order(
        conn,
        event.order,
        customer_id=event.customer_id,
        at=at,
        event_id=event.event_id,
        event_type=event.type,
    )


def record_redemption(
    event: RedemptionEvent,
    conn: psycopg.Connection[Any],
    status: RedemptionStatus,
    at: datetime | None,
    rollback: Redemption | None = None,
) -> None:
    redemption = event.redemption
    card = event.card
    conn.execute(
        sql.UPSERT_REDEMPTION,
        {
            "redemption_id": redemption.id,
            "status": status,
            "parent_redemption_id": redemption.parent_id,
            "order_id": redemption.order_id or (event.order.id if event.order else None),
            "customer_id": redemption.customer_id or event.customer_id,
            "voucher_id": card.id if card else None,
            "voucher_code": card.code if card else None,
            "voucher_type": card.type if card else None,
            "amount": redemption.amount,
            "redeemed_at": redemption.date,
            "failure_code": redemption.failure_code,
            "failure_message": redemption.failure_message,
            "rollback_id": rollback.id if rollback else None,
            "rollback_at": rollback.date if rollback else None,
            "rollback_reason": rollback.reason if rollback else None,
            "at": at,
        },
    )


def record_card_balance(
    event: RedemptionEvent, conn: psycopg.Connection[Any], at: datetime | None
) -> None:
    """The card's report (its balance after the operation, its holder) and its entries'
    holder. The top-level voucher carries the balance after the operation."""
    card = event.voucher if event.voucher is not None and event.voucher.id else event.card
    if card is None or card.id is None or card.ledger_kind is None:
        return
    balance = event.voucher.balance if event.voucher is not None else None
    reported = balance is not None and at is not None
    conn.execute(
        sql.UPSERT_CARD_BALANCE,
        {
            "voucher_id": card.id,
            "voucher_code": card.code,
            "kind": card.ledger_kind,
            "customer_id": event.holder_id,
            "balance": balance if reported else None,
            "at": at if reported else None,
        },
    )
    conn.execute(sql.SYNC_HOLDER, {"voucher_id": card.id})


def _ledger_row(
    event: RedemptionEvent,
    amount: int,
    effect: LedgerEffect,
    reason: str,
    moved_at: datetime | None,
) -> dict[str, Any]:
    card = event.card
    assert card is not None
    return {
        "customer_id": event.holder_id,
        "redeemer_id": event.customer_id,
        "voucher_id": card.id,
        "voucher_code": card.code,
        "kind": card.ledger_kind,
        "amount": amount,
        "redemption_id": event.redemption.id,
        "effect": effect,
        "reason": reason,
        "event_id": event.event_id,
        "moved_at": moved_at,
        "balance_after": event.voucher.balance if event.voucher is not None else None,
    }


def debit(event: RedemptionEvent, conn: psycopg.Connection[Any], at: datetime | None) -> None:
    card, spent = event.card, event.redemption.amount
    if card is None or card.ledger_kind is None or not spent:
        return  # discount coupons, promotion tiers, a stack's parent: no ledger effect
    entry = _ledger_row(event, -abs(spent), LedgerEffect.DEBIT, "redemption", at)
    conn.execute(sql.INSERT_LEDGER_ENTRY, entry)


def restore(
    event: RedemptionEvent, conn: psycopg.Connection[Any], reason: str, at: datetime | None
) -> None:
    card = event.card
    if card is None or card.ledger_kind is None:
        return
    rollback = event.rollback
    # The rollback's amount is negative in the payload; the original's is positive.
    amount = (rollback.amount if rollback else None) or event.redemption.amount
    if amount:
        entry = _ledger_row(event, abs(amount), LedgerEffect.RESTORE, reason, at)
        conn.execute(sql.INSERT_LEDGER_ENTRY, entry)
    else:
        conn.execute(
            sql.RESTORE_FROM_DEBIT,
            {
                **sql.EFFECTS,
                "redemption_id": event.redemption.id,
                "reason": reason,
                "event_id": event.event_id,
                "moved_at": at,
                "balance_after": event.voucher.balance if event.voucher is not None else None,
            },
        )


def roll_back_children(conn: psycopg.Connection[Any], parent_id: str | None, event_id: str) -> None:
    """A stack's rolled-back parent rolls back every child we know (``sql.ROLL_BACK_CHILDREN``)."""
    if not parent_id:
        return
    conn.execute(
        sql.ROLL_BACK_CHILDREN,
        {
            **sql.EFFECTS,
            "parent_id": parent_id,
            "event_id": event_id,
            "rolled_back": RedemptionStatus.ROLLED_BACK,
            "succeeded": RedemptionStatus.SUCCEEDED,
        },
    )


def take_parent_entries(event: RedemptionEvent, conn: psycopg.Connection[Any]) -> None:
    """A child's card entries that transactions naming its parent made first are the
    child's (``sql.TAKE_WAITING_ENTRIES``); a parent has none of its own
    (``sql.PARENT_ENTRIES_WAIT``)."""
    card, parent_id = event.card, event.redemption.parent_id
    if card is None or card.id is None:
        conn.execute(sql.PARENT_ENTRIES_WAIT, {"redemption_id": event.redemption.id})
        return
    if not parent_id:
        return
    conn.execute(
        sql.TAKE_WAITING_ENTRIES,
        {
            **sql.EFFECTS,
            "redemption_id": event.redemption.id,
            "parent_id": parent_id,
            "voucher_id": card.id,
        },
    )


@handles("redemption.succeeded", load_redemption)
@handles("customer.redemption.succeeded", load_redemption)
def redemption_succeeded(event: RedemptionEvent, conn: psycopg.Connection[Any]) -> None:
    at = _when(event.redemption.date, event.created_at)
    _record_order(event, conn, at)
    record_redemption(event, conn, RedemptionStatus.SUCCEEDED, at)
    take_parent_entries(event, conn)
    debit(event, conn, at)
    conn.execute(
        sql.RESTORE_IF_ROLLED_BACK,
        {
            **sql.EFFECTS,
            "rolled_back": RedemptionStatus.ROLLED_BACK,
            "redemption_id": event.redemption.id,
            "event_id": event.event_id,
        },
    )
    record_card_balance(event, conn, at)
    roll_back_children(conn, event.redemption.parent_id, event.event_id)  # a late child


@handles("redemption.rollback.succeeded", load_rollback)
@handles("customer.redemption.rollback.succeeded", load_rollback)
def rollback_succeeded(event: RedemptionEvent, conn: psycopg.Connection[Any]) -> None:
    rollback = event.rollback
    assert rollback is not None
    at = _when(rollback.date, event.created_at)
    _record_order(event, conn, at)
    record_redemption(event, conn, RedemptionStatus.ROLLED_BACK, at, rollback=rollback)
    take_parent_entries(event, conn)
    restore(event, conn, reason=rollback.reason or "rollback", at=at)
    record_card_balance(event, conn, at)
    roll_back_children(conn, event.redemption.id, event.event_id)  # a stack's parent


@handles("redemption.rollback.failed", load_rollback)
def rollback_failed(event: RedemptionEvent, conn: psycopg.Connection[Any]) -> None:
    rollback = event.rollback
    assert rollback is not None
    code = rollback.failure_code
    # Voucherify's failure code ``already_rolled_back`` names its category; any other
    # failure is for a person to review.
    already = code == FlagCategory.ALREADY_ROLLED_BACK
    category = FlagCategory.ALREADY_ROLLED_BACK if already else FlagCategory.REVIEW
    status, rollback_id, restored = conn.execute(
        sql.OUR_ROLLBACK, {**sql.EFFECTS, "redemption_id": event.redemption.id}
    ).fetchone() or (None, None, False)
    rolled_back = status == RedemptionStatus.ROLLED_BACK
    # Voucherify shows it rolled back; if our books do not (no ROLLED_BACK record, no
    # restore from a refund transaction either), the successful rollback's webhook was
    # lost and the restore is missing: a flag of its own.
    shown_rolled_back = event.redemption.status == RedemptionStatus.ROLLED_BACK
    if already and shown_rolled_back and not rolled_back and not restored:
        category = FlagCategory.LOST_ROLLBACK
    resolved_note = None
    if category == FlagCategory.REVIEW and rolled_back:
        resolved_note = (
            f"a rollback of the redemption succeeded (rollback {rollback_id or 'unknown'}): "
            "nothing is left to roll back"
        )
    conn.execute(
        sql.INSERT_ROLLBACK_FLAG,
        {
            "category": category,
            "redemption_id": event.redemption.id,
            "rollback_id": rollback.id,
            "voucher_id": event.card.id if event.card else None,
            "failure_code": code,
            "failure_message": rollback.failure_message,
            "event_id": event.event_id,
            "resolved_note": resolved_note,
        },
    )
    # Nothing is restored and no status moves: the failed attempt changed nothing.
    conn.execute(
        sql.TOUCH_REDEMPTION,
        {"redemption_id": event.redemption.id, "at": _when(rollback.date, event.created_at)},
    )
    log.warning(
        "rollback.failed_flagged",
        extra={"redemption_id": event.redemption.id, "failure_code": code},
    )


@handles("redemption.failed", load_redemption)
def redemption_failed(event: RedemptionEvent, conn: psycopg.Connection[Any]) -> None:
    at = _when(event.redemption.date, event.created_at)
    _record_order(event, conn, at)
    record_redemption(event, conn, RedemptionStatus.FAILED, at)
