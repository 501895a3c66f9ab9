"""Voucherify's API answer -> the webhook it would have sent: pure functions.

The job applies what our records miss as webhook events of its own, through the same
schemas and handlers as a real delivery (``workers.processing``). This module writes
their ``data`` (``redemption``, ``redemption_rollback``, ``order``, ``customer``) from
``GET /v1/redemptions/<id>`` and, for a rollback, ``GET /v1/redemptions/<rr_id>``, and
wraps it in the v2024-01-01 envelope.
"""

from __future__ import annotations

from typing import Any

from schemas.vocabulary import RedemptionStatus
from workers.jobs import synthetic
from workers.jobs.verify.compare import (
    EVENT_STATUS,
    ROLLBACK_FAILED,
    ROLLBACK_SUCCEEDED,
    amount_of,
    card_type,
    status_from,
)


def customer_of(theirs: dict[str, Any]) -> dict[str, Any] | None:
    customer = theirs.get("customer")
    customer_id = (customer or {}).get("id") if isinstance(customer, dict) else None
    customer_id = customer_id or theirs.get("customer_id")
    return {"id": customer_id} if customer_id else None


def order_of(obj: dict[str, Any]) -> dict[str, Any] | None:
    order = obj.get("order")
    return order if isinstance(order, dict) and order.get("id") else None


def voucher_of(theirs: dict[str, Any]) -> dict[str, Any] | None:
    """The redemption's voucher with the ``type`` the webhook schema reads the card from:
    the API's voucher has none, the kind is in the answer's ``gift`` / ``loyalty_card``."""
    voucher = theirs.get("voucher")
    if not isinstance(voucher, dict):
        return None
    kind = card_type(theirs)
    return {**voucher, "type": kind} if kind else voucher


def snapshot(theirs: dict[str, Any], status: str | None = None) -> dict[str, Any]:
    """The ``redemption`` object of a webhook, from the API's redemption."""
    order = order_of(theirs)
    return {
        "id": theirs.get("id"),
        "object": "redemption",
        "status": status or status_from(theirs),
        "date": theirs.get("date"),
        "amount": amount_of(theirs),
        "redemption": theirs.get("redemption"),
        "customer_id": theirs.get("customer_id"),
        "failure_code": theirs.get("failure_code"),
        "failure_message": theirs.get("failure_message"),
        "reason": theirs.get("reason"),
        "order": {"id": order["id"]} if order else None,
        "voucher": voucher_of(theirs),
    }


def succeeded_data(theirs: dict[str, Any]) -> dict[str, Any]:
    """``data`` of ``redemption.succeeded`` (and of ``redemption.failed``)."""
    # No top-level ``voucher``: its balance is a snapshot of unknown time, and the handlers
    # read the card from the redemption's own voucher.
    return {
        "redemption": snapshot(theirs),
        "order": order_of(theirs),
        "customer": customer_of(theirs),
        "voucher": None,
    }


def rollback_data(theirs: dict[str, Any], rollback: dict[str, Any]) -> dict[str, Any]:
    """``data`` of ``redemption.rollback.succeeded``; the rollback's amount is negative."""
    amount = amount_of(rollback)
    order = order_of(rollback) or order_of(theirs)
    return {
        "redemption": snapshot(theirs, RedemptionStatus.ROLLED_BACK),
        "redemption_rollback": {
            "id": rollback.get("id"),
            "object": "redemption_rollback",
            "status": RedemptionStatus.SUCCEEDED,
            "date": rollback.get("date"),
            "amount": -abs(amount) if amount else None,
            "redemption": theirs.get("id"),
            "customer_id": rollback.get("customer_id") or theirs.get("customer_id"),
            "reason": rollback.get("reason"),
            "order": {"id": order["id"]} if order else None,
        },
        "order": order,
        "customer": customer_of(theirs),
        "voucher": None,
    }


def rollback_failed_data(
    theirs: dict[str, Any] | None, redemption_id: str, rollback: dict[str, Any]
) -> dict[str, Any]:
    """``data`` of ``redemption.rollback.failed``, from a failed rollback of the listing and
    its redemption when this run listed it (else the rollback's own voucher)."""
    redemption = (
        snapshot(theirs)
        if theirs is not None
        else {"id": redemption_id, "object": "redemption", "voucher": voucher_of(rollback)}
    )
    return {
        "redemption": redemption,
        "redemption_rollback": {
            "id": rollback.get("id"),
            "object": "redemption_rollback",
            "status": RedemptionStatus.FAILED,
            "date": rollback.get("date"),
            "redemption": redemption_id,
            "customer_id": rollback.get("customer_id"),
            "failure_code": rollback.get("failure_code"),
            "failure_message": rollback.get("failure_message"),
            "reason": rollback.get("reason"),
        },
        "order": None,
        "customer": customer_of(rollback),
        "voucher": None,
    }


def order_data(order: dict[str, Any]) -> dict[str, Any]:
    """``data`` of ``customer.order.updated``: the order as the listing shows it."""
    customer_id = order.get("customer_id")
    return {"order": order, "customer": {"id": customer_id} if customer_id else None}


def event_data(
    event_type: str, theirs: dict[str, Any], rollback: dict[str, Any] | None
) -> tuple[dict[str, Any], str | None]:
    """The ``data`` of one missing event and the date it happened at, when known."""
    if event_type == ROLLBACK_SUCCEEDED:
        assert rollback is not None  # compare.missing_events asks for it only with one
        return rollback_data(theirs, rollback), rollback.get("date") or theirs.get("date")
    return succeeded_data(theirs), theirs.get("date")


def event_id(redemption_id: str, event_type: str) -> str:
    """One synthetic event per redemption and status: the inbox records it once."""
    return f"verify:{redemption_id}:{EVENT_STATUS[event_type]}"


def rollback_failed_event_id(rollback_id: str) -> str:
    """One per failed rollback (a redemption may have several)."""
    return f"verify:{rollback_id}:{ROLLBACK_FAILED}"


def order_event_id(order_id: str, status: str, at: str | None) -> str:
    """One per change of an order: its status at its date."""
    return f"verify:order:{order_id}:{status}:{at or 'undated'}"


def webhook_body(event_id: str, event_type: str, data: dict[str, Any], created_at: str) -> str:
    """The raw body of the webhook, v2024-01-01 envelope, as a delivery carries it."""
    return synthetic.webhook_body("verify", event_id, event_type, data, created_at)
