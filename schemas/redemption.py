"""Marshmallow schemas of the redemption family, loading into frozen dataclasses.

Only the fields the handlers use are declared; everything else is excluded at the
boundary (a full load of the 6 KB payload costs several times more). All six types share
one data shape (``EventCustomerRedemption`` in Voucherify's spec), so one set of schemas
serves them; the per-type schemas differ in what they require.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, validate

from schemas import vocabulary
from schemas.vocabulary import (
    LEDGER_KIND_OF_VOUCHER,
    LedgerKind,
    OrderStatus,
    VoucherType,
    values,
)

REDEMPTION_STATUSES = values(vocabulary.RedemptionStatus)
ORDER_STATUSES = values(OrderStatus)
GIFT_VOUCHER = VoucherType.GIFT_VOUCHER
LOYALTY_CARD = VoucherType.LOYALTY_CARD
_CARDS = frozenset(VoucherType)


class RedemptionStatus(fields.String):
    """``ROLLED BACK`` (webhook schema) and ``ROLLED_BACK`` (REST, examples) are one status."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs).strip().upper().replace(" ", "_")
        if text not in REDEMPTION_STATUSES:
            raise ValidationError(f"Must be one of: {', '.join(REDEMPTION_STATUSES)}.")
        return text


class _Loose(Schema):
    class Meta:
        unknown = EXCLUDE


def _opt_str() -> fields.String:
    return fields.String(allow_none=True, load_default=None)


_INT64 = validate.Range(min=-(2**63), max=2**63 - 1)


def _opt_int() -> fields.Integer:
    return fields.Integer(strict=True, allow_none=True, load_default=None, validate=_INT64)


class WholeBalance(fields.Float):
    """A card balance in its smallest unit. Voucherify's schema types it ``number``: an
    integral one (``1000`` or ``1000.0``) is that many units; a fractional one cannot be,
    and is read as no report at all (the event is still applied; drift waits for the
    next report). Not a string, not a boolean, not NaN or Infinity."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, bool | str):
            raise ValidationError("Not a valid number.")
        if isinstance(value, int):
            whole = value
        else:
            number = super()._deserialize(value, attr, data, **kwargs)
            if not number.is_integer():
                return None
            whole = int(number)
        return whole if -(2**63) <= whole < 2**63 else None


def _opt_datetime() -> fields.AwareDateTime:
    return fields.AwareDateTime(allow_none=True, load_default=None, default_timezone=None)


# --- dataclasses ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Order:
    id: str | None
    """The schema does not require it: an order without one is not recorded."""
    status: str | None
    amount: int | None
    total_amount: int | None
    customer_id: str | None
    updated_at: datetime | None


@dataclass(frozen=True, slots=True)
class Voucher:
    id: str | None
    code: str | None
    type: str | None
    gift_balance: int | None
    loyalty_balance: int | None
    holder_id: str | None = None
    """The card's holder (``voucher.holder_id``): whom its ledger belongs to."""

    @property
    def balance(self) -> int | None:
        """The card's balance after the operation, in its own unit (None for non-cards)."""
        kind = self.ledger_kind
        if kind is None:
            return None
        return self.gift_balance if kind == LedgerKind.GIFT_CREDIT else self.loyalty_balance

    @property
    def ledger_kind(self) -> LedgerKind | None:
        """``gift_credit`` / ``loyalty_points`` for cards; None for coupons and the rest."""
        return LEDGER_KIND_OF_VOUCHER.get(VoucherType(self.type)) if self.type in _CARDS else None


@dataclass(frozen=True, slots=True)
class Redemption:
    id: str
    status: str | None
    date: datetime | None
    amount: int | None
    parent_id: str | None
    customer_id: str | None
    failure_code: str | None
    failure_message: str | None
    reason: str | None
    order_id: str | None
    voucher: Voucher | None


@dataclass(frozen=True, slots=True)
class RedemptionEvent:
    """One event of the redemption family, as the handlers see it."""

    event_id: str
    type: str
    created_at: datetime | None
    redemption: Redemption
    rollback: Redemption | None
    order: Order | None
    voucher: Voucher | None
    customer_id: str | None
    """The customer who redeemed (``data.customer``), not necessarily the card's holder."""
    data_holder_id: str | None = None
    """``data.holder.id``: the card's holder as the event names it beside the voucher."""

    @property
    def card(self) -> Voucher | None:
        """The voucher whose balance this redemption moved (top level, else the snapshot)."""
        if self.voucher is not None and self.voucher.type:
            return self.voucher
        return self.redemption.voucher

    @property
    def holder_id(self) -> str | None:
        """The card's holder, from whichever snapshot of the card names one, else from
        ``data.holder`` (a voucher snapshot without ``holder_id``)."""
        for card in (self.voucher, self.redemption.voucher):
            if card is not None and card.holder_id:
                return card.holder_id
        return self.data_holder_id


# --- schemas -------------------------------------------------------------------------


class _Balance(_Loose):
    balance = WholeBalance(allow_none=True, load_default=None)


class VoucherSchema(_Loose):
    id = _opt_str()
    code = _opt_str()
    type = _opt_str()
    holder_id = _opt_str()
    gift = fields.Nested(_Balance, allow_none=True, load_default=None)
    loyalty_card = fields.Nested(_Balance, allow_none=True, load_default=None)

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> Voucher:
        gift, loyalty = data["gift"], data["loyalty_card"]
        return Voucher(
            id=data["id"],
            code=data["code"],
            type=(data["type"] or "").upper() or None,
            gift_balance=gift["balance"] if gift else None,
            loyalty_balance=loyalty["balance"] if loyalty else None,
            holder_id=data["holder_id"],
        )


class OrderSchema(_Loose):
    id = _opt_str()
    status = fields.String(
        allow_none=True, load_default=None, validate=validate.OneOf(ORDER_STATUSES)
    )
    amount = _opt_int()
    total_amount = _opt_int()
    customer_id = _opt_str()
    updated_at = _opt_datetime()
    created_at = _opt_datetime()

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> Order:
        return Order(
            id=data["id"],
            status=data["status"],
            amount=data["amount"],
            total_amount=data["total_amount"],
            customer_id=data["customer_id"],
            updated_at=data["updated_at"] or data["created_at"],
        )


class _OrderRef(_Loose):
    id = _opt_str()


class RollbackSchema(_Loose):
    """``redemption_rollback``: its own fields only; the order and voucher are top level."""

    id = fields.String(required=True, validate=validate.Length(min=1))
    status = RedemptionStatus(allow_none=True, load_default=None)
    date = _opt_datetime()
    amount = _opt_int()
    redemption = _opt_str()
    customer_id = _opt_str()
    failure_code = _opt_str()
    failure_message = _opt_str()
    reason = _opt_str()

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> Redemption:
        data.setdefault("order", None)
        data.setdefault("voucher", None)
        return Redemption(
            id=data["id"],
            status=data["status"],
            date=data["date"],
            amount=data["amount"],
            parent_id=data["redemption"],
            customer_id=data["customer_id"],
            failure_code=data["failure_code"],
            failure_message=data["failure_message"],
            reason=data["reason"],
            order_id=data["order"]["id"] if data["order"] else None,
            voucher=data["voucher"],
        )


class RedemptionSchema(RollbackSchema):
    order = fields.Nested(_OrderRef, allow_none=True, load_default=None)
    voucher = fields.Nested(VoucherSchema, allow_none=True, load_default=None)


class _Customer(_Loose):
    id = _opt_str()


class RedemptionDataSchema(_Loose):
    """``data`` of a redemption-family event; the rollback events require the rollback."""

    redemption = fields.Nested(RedemptionSchema, required=True)
    redemption_rollback = fields.Nested(RollbackSchema, allow_none=True, load_default=None)
    order = fields.Nested(OrderSchema, allow_none=True, load_default=None)
    voucher = fields.Nested(VoucherSchema, allow_none=True, load_default=None)
    customer = fields.Nested(_Customer, allow_none=True, load_default=None)
    holder = fields.Nested(_Customer, allow_none=True, load_default=None)


class RollbackDataSchema(RedemptionDataSchema):
    redemption_rollback = fields.Nested(RollbackSchema, required=True)


_REDEMPTION_DATA = RedemptionDataSchema()
_ROLLBACK_DATA = RollbackDataSchema()
_DATETIME = fields.AwareDateTime(allow_none=True)


def _event_created_at(created_at: str | None) -> datetime | None:
    try:
        return _DATETIME.deserialize(created_at) if created_at else None
    except ValidationError as exc:
        raise ValidationError({"event.created_at": exc.messages}) from exc


def load_redemption_event(
    event_id: str, event_type: str, created_at: str | None, data: Any, rollback: bool
) -> RedemptionEvent:
    """Load ``data`` of a redemption-family event; raises ``ValidationError`` when invalid."""
    if not isinstance(data, dict):
        raise ValidationError({"data": ["Must be an object."]})
    schema = _ROLLBACK_DATA if rollback else _REDEMPTION_DATA
    loaded: dict[str, Any] = schema.load(data)
    created = _event_created_at(created_at)
    redemption: Redemption = loaded["redemption"]
    order: Order | None = loaded["order"]
    customer = loaded["customer"]
    return RedemptionEvent(
        event_id=event_id,
        type=event_type,
        created_at=created,
        redemption=redemption,
        rollback=loaded["redemption_rollback"],
        order=order,
        voucher=loaded["voucher"],
        customer_id=(customer or {}).get("id")
        or redemption.customer_id
        or (order.customer_id if order else None),
        data_holder_id=(loaded["holder"] or {}).get("id"),
    )


# --- order events ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OrderEvent:
    """``customer.order.created`` / ``paid`` / ``updated`` / ``canceled``: the order as of
    one change (``EventCustomerOrder`` in Voucherify's spec)."""

    event_id: str
    type: str
    created_at: datetime | None
    order: Order
    customer_id: str | None


class _RequiredOrderSchema(OrderSchema):
    id = fields.String(required=True, validate=validate.Length(min=1))


class OrderDataSchema(_Loose):
    order = fields.Nested(_RequiredOrderSchema, required=True)
    customer = fields.Nested(_Customer, allow_none=True, load_default=None)


_ORDER_DATA = OrderDataSchema()


def load_order_event(
    event_id: str, event_type: str, created_at: str | None, data: Any
) -> OrderEvent:
    """Load ``data`` of an order event; raises ``ValidationError`` when invalid (an order
    without an id cannot be recorded)."""
    if not isinstance(data, dict):
        raise ValidationError({"data": ["Must be an object."]})
    loaded: dict[str, Any] = _ORDER_DATA.load(data)
    created = _event_created_at(created_at)
    order: Order = loaded["order"]
    return OrderEvent(
        event_id=event_id,
        type=event_type,
        created_at=created,
        order=order,
        customer_id=order.customer_id or (loaded["customer"] or {}).get("id"),
    )
