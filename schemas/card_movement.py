"""Marshmallow schema of the card movement events, loading into one frozen dataclass.

Two families describe the same movements of a card's balance, each keyed by Voucherify's
transaction id (``vtx_...``):

- the transaction events (``voucher.gift.transaction.created``,
  ``voucher.loyalty_card.transaction.created``): ``data.transaction`` with
  ``details.balance`` (``amount`` for gift credit, ``points`` for loyalty points, signed;
  ``balance`` after the movement), ``details.redemption.id`` / ``details.rollback.id`` for
  the movements of a redemption or its rollback;
- the balance events (``voucher.gift.balance_added``, ``voucher.loyalty_card.points_added``,
  ``..points_expired``, ``..pending_points.activated`` and their ``customer.*`` twins):
  the same ``transaction`` (its ``details`` may be null), a top-level ``balance`` (or, for
  an expiry, a top-level ``points`` count) and the card in ``voucher``.

Whatever a payload lacks is taken from where the other family puts it, in this order:
``transaction.details.balance``, the top-level ``balance``, the top-level ``points`` (an
expiry's, a count: negated), the card's own balance in ``voucher``. A payload whose
``transaction`` is null or missing (allowed; the published
``customer.voucher.loyalty_card.pending_points.activated`` has none) reports the card's
balance and holder but keys no movement. Only the fields used
are declared; the rest is excluded at the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields

from schemas.redemption import WholeBalance
from schemas.vocabulary import LedgerKind


class _Loose(Schema):
    class Meta:
        unknown = EXCLUDE


def _opt_str() -> fields.String:
    return fields.String(allow_none=True, load_default=None)


def _opt_whole() -> WholeBalance:
    return WholeBalance(allow_none=True, load_default=None)


def _opt_datetime() -> fields.AwareDateTime:
    return fields.AwareDateTime(allow_none=True, load_default=None, default_timezone=None)


def _nested(schema: type[Schema]) -> fields.Nested:
    return fields.Nested(schema, allow_none=True, load_default=None)


class _Ref(_Loose):
    id = _opt_str()


class _Balance(_Loose):
    amount = _opt_whole()
    points = _opt_whole()
    balance = _opt_whole()


class _Details(_Loose):
    balance = _nested(_Balance)
    redemption = _nested(_Ref)
    rollback = _nested(_Ref)
    earning_rule = _nested(_Ref)
    order = _nested(_Ref)
    event = _nested(_Ref)


class _Transaction(_Loose):
    id = _opt_str()  # the schema does not require it: without one, no movement is keyed
    type = _opt_str()
    voucher_id = _opt_str()
    reason = _opt_str()
    source = _opt_str()
    details = _nested(_Details)
    created_at = _opt_datetime()


class _CardBalance(_Loose):
    balance = _opt_whole()


class _Voucher(_Loose):
    id = _opt_str()
    code = _opt_str()
    holder_id = _opt_str()
    gift = _nested(_CardBalance)
    loyalty_card = _nested(_CardBalance)


class CardMovementDataSchema(_Loose):
    transaction = _nested(_Transaction)
    voucher = _nested(_Voucher)
    balance = _nested(_Balance)
    points = _opt_whole()
    holder = _nested(_Ref)
    customer = _nested(_Ref)
    # customer.rewarded.loyalty_points: the accrual's earning rule and what triggered it.
    earning_rule = _nested(_Ref)
    order = _nested(_Ref)
    event = _nested(_Ref)


@dataclass(frozen=True, slots=True)
class CardMovementEvent:
    """One movement of a card's balance, as the handlers see it."""

    event_id: str
    type: str
    kind: LedgerKind
    transaction_id: str | None
    """None when the payload names no transaction (the published
    ``customer.voucher.loyalty_card.pending_points.activated`` does not; the schemas do not
    require one): its movement is the entry of a twin event that names it; alone the
    event is only a report of the card's balance and holder."""
    transaction_type: str | None
    voucher_id: str | None
    voucher_code: str | None
    holder_id: str | None
    amount: int | None
    """Signed in the card's unit: + credit, - debit. None when no part of the payload says."""
    balance_after: int | None
    balance_from_snapshot: bool
    """``balance_after`` is the card's snapshot in ``voucher``, not the movement's own report:
    the movement's transaction, when it comes, replaces it."""
    moved_at: datetime | None
    redemption_id: str | None
    rollback_id: str | None
    reason: str | None
    accrual_key: str | None = None
    """An earning-rule accrual's key: card, earning rule, and the order (else the event)
    that triggered it. ``customer.rewarded.loyalty_points`` names no transaction, and its
    ``POINTS_ACCRUAL`` transaction's details name the same three: one entry for both."""


_DATA = CardMovementDataSchema()
_DATETIME = fields.AwareDateTime(allow_none=True)


def kind_of(event_type: str) -> LedgerKind:
    return LedgerKind.GIFT_CREDIT if ".gift." in f".{event_type}" else LedgerKind.LOYALTY_POINTS


def _first(*candidates: Any) -> Any:
    return next((c for c in candidates if c is not None), None)


def load_card_movement(
    event_id: str, event_type: str, created_at: str | None, data: Any
) -> CardMovementEvent:
    """Load ``data`` of a card movement event; raises ``ValidationError`` when invalid."""
    if not isinstance(data, dict):
        raise ValidationError({"data": ["Must be an object."]})
    loaded: dict[str, Any] = _DATA.load(data)
    try:
        created = _DATETIME.deserialize(created_at) if created_at else None
    except ValidationError as exc:
        raise ValidationError({"event.created_at": exc.messages}) from exc
    kind = kind_of(event_type)
    gift = kind == LedgerKind.GIFT_CREDIT
    transaction: dict[str, Any] = loaded["transaction"] or dict.fromkeys(_Transaction().fields)
    details: dict[str, Any] = transaction["details"] or {}
    voucher: dict[str, Any] = loaded["voucher"] or {}
    unit = "amount" if gift else "points"
    reports = [b for b in (details.get("balance"), loaded["balance"]) if b]
    amount = _first(*(b[unit] for b in reports))
    if amount is None and loaded["points"] is not None:
        # An expiry's top-level ``points`` is how many expired: a count, not signed.
        expired = event_type.endswith("points_expired")
        amount = -abs(loaded["points"]) if expired else abs(loaded["points"])
    card_balance = voucher.get("gift" if gift else "loyalty_card") or {}
    reported = _first(*(b["balance"] for b in reports))
    voucher_id = _first(transaction["voucher_id"], voucher.get("id"))
    transaction_type = (transaction["type"] or "").upper() or None
    return CardMovementEvent(
        event_id=event_id,
        type=event_type,
        kind=kind,
        transaction_id=transaction["id"] or None,
        transaction_type=transaction_type,
        voucher_id=voucher_id,
        voucher_code=voucher.get("code"),
        holder_id=_first(
            (loaded["holder"] or {}).get("id"),
            voucher.get("holder_id"),
            (loaded["customer"] or {}).get("id"),
        ),
        amount=amount,
        balance_after=_first(reported, card_balance.get("balance")),
        balance_from_snapshot=reported is None and card_balance.get("balance") is not None,
        moved_at=_first(transaction["created_at"], created),
        redemption_id=(details.get("redemption") or {}).get("id"),
        rollback_id=(details.get("rollback") or {}).get("id"),
        reason=_first(transaction["reason"], transaction["type"]),
        accrual_key=_accrual_key(voucher_id, transaction_type, details, loaded),
    )


def _accrual_key(
    voucher_id: str | None,
    transaction_type: str | None,
    details: dict[str, Any],
    loaded: dict[str, Any],
) -> str | None:
    """The accrual's key from the transaction's details, else from the rewarded event's
    own fields; None for any other movement, or when the payload does not name them."""
    if transaction_type not in (None, "POINTS_ACCRUAL"):
        return None
    source = details if transaction_type else loaded
    rule = (source.get("earning_rule") or {}).get("id")
    order = (source.get("order") or {}).get("id")
    trigger = (source.get("event") or {}).get("id")
    if not (voucher_id and rule and (order or trigger)):
        return None
    return f"{voucher_id}:{rule}:" + (f"order:{order}" if order else f"event:{trigger}")
