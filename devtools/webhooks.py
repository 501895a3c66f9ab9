"""Webhook helpers shared by the tests and the benchmarks: fixture payloads, envelopes,
signatures, card payload builders, polling.

The payloads are the published examples kept in ``tests/fixtures``.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
VOUCHERIFY = FIXTURES / "voucherify"
SEEDS = FIXTURES / "seeds"
SECRET = "test-secret"  # noqa: S105 - the webhook secret of tests and local runs

T = TypeVar("T")

REDEMPTION_FAMILY = (
    "redemption.succeeded",
    "redemption.failed",
    "redemption.rollback.succeeded",
    "redemption.rollback.failed",
    "customer.redemption.succeeded",
    "customer.redemption.rollback.succeeded",
)


def fixture(name: str) -> dict[str, Any]:
    """A published payload from tests/fixtures/voucherify (``name`` without .example.json)."""
    path = VOUCHERIFY / f"{name}.example.json"
    return dict(json.loads(path.read_text()))


def envelope(
    event_type: str,
    data: Any,
    event_id: str | None = None,
    created_at: str = "2024-02-01T10:30:00.000Z",
    distribution: bool = False,
) -> dict[str, Any]:
    """A v2024-01-01 envelope around ``data``, as Voucherify POSTs it."""
    event_id = event_id or f"ev_{uuid.uuid4().hex[:18]}"
    return {
        "id": f"whs_{uuid.uuid4().hex[:18]}",
        "project_id": "proj_test",
        "created_at": created_at,
        "type": "Voucher-redeemed" if distribution else event_type,
        "data": data,
        "source": {
            "id": "distr_test" if distribution else "wh_test",
            "object": "distribution" if distribution else "webhook",
            "target_url": "https://example.test/webhooks/voucherify",
        },
        "event": {
            "id": event_id,
            "type": event_type,
            "created_at": created_at,
            "entity_id": "r_test",
            "group_id": "v-test",
            "event_source": {"channel": "API"},
        },
    }


def body_of(document: dict[str, Any]) -> bytes:
    """Compact JSON, as Voucherify sends it."""
    return json.dumps(document, separators=(",", ":")).encode()


def sign(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def wait_until(
    probe: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.1,
    what: str | Callable[[], str] = "condition",
) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds.

    ``what`` may be a callable, called only on failure: process logs read then, not before.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {described}")
        time.sleep(interval)


# --- card redemptions built from the published payloads ------------------------------
# The published redemption-family examples involve only discount coupons. VOUCHERIFY.md
# says where the amounts live: ``redemption.amount`` (positive) on a gift card or loyalty
# card redemption, ``redemption_rollback.amount`` (negative) on its rollback, and the
# balances after the operation on ``voucher.gift`` / ``voucher.loyalty_card``. The card
# vouchers below come from the published REST rollback examples.


def gift_voucher(balance: int) -> dict[str, Any]:
    voucher = copy.deepcopy(
        json.loads(
            (VOUCHERIFY / "api.redemption-rollback.response.gift-card.example.json").read_text()
        )["voucher"]
    )
    voucher["gift"] = {"amount": 10000, "balance": balance, "effect": "APPLY_TO_ORDER"}
    return dict(voucher)


def loyalty_voucher(balance: int) -> dict[str, Any]:
    voucher = copy.deepcopy(fixture("redemption.succeeded")["voucher"])
    voucher.update(
        {
            "id": "v_loyalty_test",
            "code": "LOYALTY-TEST-1",
            "type": "LOYALTY_CARD",
            "loyalty_card": {"points": 1000, "balance": balance},
        }
    )
    voucher.pop("discount", None)
    return dict(voucher)


def _card(kind: str, balance: int, voucher_id: str | None, holder_id: str | None) -> dict[str, Any]:
    voucher = gift_voucher(balance) if kind == "gift" else loyalty_voucher(balance)
    if voucher_id:
        voucher.update({"id": voucher_id, "code": f"CODE-{voucher_id}"})
    voucher["holder_id"] = holder_id
    return voucher


def card_redemption(
    kind: str,
    redemption_id: str,
    amount: int,
    balance_after: int,
    order_id: str = "ord_card_test",
    customer_id: str = "cust_card_test",
    date: str = "2024-02-01T08:45:32.014Z",
    voucher_id: str | None = None,
    holder_id: str | None = "",
) -> dict[str, Any]:
    """``data`` of a redemption.succeeded spending ``amount`` of a gift or loyalty card.
    The card's holder is the redeeming customer unless ``holder_id`` says otherwise."""
    data = copy.deepcopy(fixture("redemption.succeeded"))
    voucher = _card(kind, balance_after, voucher_id, customer_id if holder_id == "" else holder_id)
    data["voucher"] = voucher
    data["customer"]["id"] = customer_id
    data["order"].update({"id": order_id, "customer_id": customer_id, "status": "PAID"})
    data["redemption"].update(
        {
            "id": redemption_id,
            "amount": amount,
            "date": date,
            "customer_id": customer_id,
            "voucher": copy.deepcopy(voucher),
        }
    )
    data["redemption"]["order"]["id"] = order_id
    return data


def card_rollback(
    kind: str,
    redemption_id: str,
    rollback_id: str,
    amount: int,
    balance_after: int,
    order_id: str = "ord_card_test",
    customer_id: str = "cust_card_test",
    date: str = "2024-02-01T10:23:52.499Z",
    include_amount: bool = True,
    voucher_id: str | None = None,
    holder_id: str | None = "",
) -> dict[str, Any]:
    """``data`` of a redemption.rollback.succeeded giving ``amount`` back to the card."""
    data = copy.deepcopy(fixture("redemption.rollback.succeeded"))
    voucher = _card(kind, balance_after, voucher_id, customer_id if holder_id == "" else holder_id)
    data["voucher"] = voucher
    data["customer"]["id"] = customer_id
    data["order"].update({"id": order_id, "customer_id": customer_id, "status": "CANCELED"})
    data["redemption"].update(
        {"id": redemption_id, "customer_id": customer_id, "voucher": copy.deepcopy(voucher)}
    )
    data["redemption"]["order"]["id"] = order_id
    rollback = data["redemption_rollback"]
    rollback.update(
        {"id": rollback_id, "redemption": redemption_id, "date": date, "customer_id": customer_id}
    )
    if include_amount:
        rollback["amount"] = -abs(amount)
    rollback["order"]["id"] = order_id
    rollback["voucher"]["id"] = voucher["id"]  # the published payload's own card otherwise
    return data


def card_rollback_failed(
    redemption_id: str,
    rollback_id: str,
    code: str = "already_rolled_back",
    order_id: str | None = None,
    voucher_id: str | None = None,
) -> dict[str, Any]:
    """``data`` of a redemption.rollback.failed; ``order_id`` and ``voucher_id``, when
    given, replace the published payload's own order and card (one for every event)."""
    data = copy.deepcopy(fixture("redemption.rollback.failed"))
    data["redemption"]["id"] = redemption_id
    if order_id is not None:
        data["redemption"]["order"]["id"] = order_id
    if voucher_id is not None:
        for holder in (data, data["redemption"], data["redemption_rollback"]):
            holder["voucher"]["id"] = voucher_id
    data["redemption_rollback"].update(
        {
            "id": rollback_id,
            "redemption": redemption_id,
            "failure_code": code,
            "failure_message": code.replace("_", " ").capitalize(),
        }
    )
    return data


# --- card movements built from the published payloads ---------------------------------
# ``voucher.{gift,loyalty_card}.transaction.created`` and the balance events describe one
# movement each: ``transaction.details.balance`` holds its signed amount (``amount`` for
# gift credit, ``points`` for loyalty points) and the balance after it.

CARD_IDS = {"gift": gift_voucher(0)["id"], "loyalty": "v_loyalty_test"}
"""The card of each kind that ``card_redemption`` / ``card_rollback`` use by default."""

BALANCE_EVENT = {
    "CREDITS_ADDITION": "voucher.gift.balance_added",
    "POINTS_ADDITION": "voucher.loyalty_card.points_added",
    "POINTS_EXPIRATION": "voucher.loyalty_card.points_expired",
    "PENDING_POINTS_ACTIVATION": "voucher.loyalty_card.pending_points.activated",
}
"""The balance event that describes the same movement as a transaction of this type."""


def card_transaction(
    kind: str,
    transaction_id: str,
    transaction_type: str,
    amount: int,
    balance_after: int,
    created_at: str,
    voucher_id: str | None = None,
    redemption_id: str | None = None,
    rollback_id: str | None = None,
    order_id: str | None = None,
) -> dict[str, Any]:
    """The ``transaction`` object of a card movement, in the published examples' shape; a
    redemption's or rollback's names its order (``order_id``, else ``ord_<redemption_id>``)."""
    gift = kind == "gift"
    published = fixture(f"voucher.{'gift' if gift else 'loyalty_card'}.transaction.created")
    transaction = copy.deepcopy(published["transaction"])
    card = voucher_id or CARD_IDS[kind]
    balance = transaction["details"]["balance"]
    balance.update({"balance": balance_after, "total": max(balance_after, 0)})
    balance["amount" if gift else "points"] = amount
    balance["related_object"]["id"] = card
    details: dict[str, Any] = {"balance": balance}
    if redemption_id:
        details["order"] = {"id": order_id or f"ord_{redemption_id}", "source_id": None}
        details["redemption"] = {"id": redemption_id}
    if rollback_id:
        details["rollback"] = {"id": rollback_id}
    transaction.update(
        {
            "id": transaction_id,
            "voucher_id": card,
            "type": transaction_type,
            "details": details,
            "created_at": created_at,
        }
    )
    return dict(transaction)


def _other_card(kind: str, transaction: dict[str, Any]) -> str | None:
    """The transaction's card when it is not the default one of its kind."""
    voucher_id = transaction["voucher_id"]
    return None if voucher_id == CARD_IDS[kind] else str(voucher_id)


def card_transaction_event(
    kind: str, transaction: dict[str, Any], holder_id: str | None = "cust_card_test"
) -> tuple[str, dict[str, Any]]:
    """(type, data) of the ``transaction.created`` event of ``transaction``."""
    event_type = f"voucher.{'gift' if kind == 'gift' else 'loyalty_card'}.transaction.created"
    data = copy.deepcopy(fixture(event_type))
    balance = transaction["details"]["balance"]
    voucher = _card(kind, balance["balance"], _other_card(kind, transaction), holder_id)
    data.update(
        {
            "transaction": copy.deepcopy(transaction),
            "voucher": voucher,
            "balance": copy.deepcopy(balance),
            "holder": {**data["holder"], "id": holder_id} if holder_id else None,
            "order": None,
            "redemption": None,
            "rollback": None,
        }
    )
    return event_type, data


def card_balance_event(
    kind: str,
    transaction: dict[str, Any],
    holder_id: str | None = "cust_card_test",
    customer_twin: bool = False,
) -> tuple[str, dict[str, Any]] | None:
    """(type, data) of the balance event that describes ``transaction``, if its type has one
    (its ``customer.*`` twin with ``customer_twin``). As published, its
    ``transaction.details`` is null: the figures are in ``balance`` (an expiry's in
    ``points``) and the card in ``voucher``."""
    event_type = BALANCE_EVENT.get(transaction["type"])
    if event_type is None:
        return None
    if customer_twin:
        event_type = f"customer.{event_type}"
    data = copy.deepcopy(fixture(event_type))
    balance = transaction["details"]["balance"]
    voucher = _card(kind, balance["balance"], _other_card(kind, transaction), holder_id)
    data["voucher"] = voucher
    data["transaction"] = {**copy.deepcopy(transaction), "details": None}
    if transaction["type"] == "POINTS_EXPIRATION":
        data["points"] = abs(balance["points"])
        data.pop("balance", None)
    else:
        data["balance"] = copy.deepcopy(balance)
    if "customer" in data and holder_id:
        data["customer"] = {**data["customer"], "id": holder_id}
    return event_type, data


# --- stacked redemptions ---------------------------------------------------------------
# A stacked redemption (POST /v1/redemptions with several redeemables) is a parent
# (``object: redemption``, no voucher of its own) and one child per redeemable, each child
# naming the parent in ``redemption.redemption``; the order lists the stack under the
# parent (``order.redemptions[<parent>].stacked``). Rolling the parent back rolls back
# every child: the parent's rollback webhook, and maybe one per child besides.


def stack_child(
    data: dict[str, Any], parent_id: str, parent_rollback_id: str | None = None
) -> dict[str, Any]:
    """A child's redemption or rollback ``data`` (``card_redemption``, ``card_rollback``,
    ``coupon_redemption``...): its redemption names the stack's parent, a rollback its
    parent's rollback (``parent_rollback_id``)."""
    data["redemption"]["redemption"] = parent_id
    if parent_rollback_id is not None and data.get("redemption_rollback"):
        data["redemption_rollback"]["parent_rollback_id"] = parent_rollback_id
    return data


def _stacked_order(data: dict[str, Any], parent_id: str, children: list[str], date: Any) -> None:
    """``order.redemptions[<parent>]`` and the parent's ``related_redemptions``, as a stack's."""
    if not children:
        return
    data["order"]["redemptions"] = {
        parent_id: {
            "date": date,
            "related_object_type": "redemption",
            "related_object_id": parent_id,
            "related_object_parent_id": None,
            "stacked": list(children),
        }
    }
    related = data["redemption"].setdefault("related_redemptions", {"rollbacks": []})
    related["redemptions"] = [{"id": child, "date": date} for child in children]


def stack_parent_redemption(
    parent_id: str,
    amount: int,
    children: list[str] | tuple[str, ...] = (),
    order_id: str | None = None,
    customer_id: str | None = None,
    date: str | None = None,
) -> dict[str, Any]:
    """``data`` of a stack's parent redemption.succeeded: no voucher, the children's total
    ``amount``; the published order, customer and date unless given."""
    data = copy.deepcopy(fixture("redemption.succeeded"))
    data["voucher"] = None
    data["redemption"].update(
        {
            "id": parent_id,
            "amount": amount,
            "object": "redemption",
            "voucher": None,
            "redemption": None,
        }
    )
    if order_id is not None:
        data["order"]["id"] = order_id
        data["redemption"]["order"]["id"] = order_id
    if customer_id is not None:
        data["customer"]["id"] = customer_id
        data["order"]["customer_id"] = customer_id
        data["redemption"]["customer_id"] = customer_id
    if date is not None:
        data["redemption"]["date"] = date
    _stacked_order(data, parent_id, list(children), data["redemption"]["date"])
    return data


def stack_parent_rollback(
    parent_id: str,
    rollback_id: str,
    amount: int,
    order_id: str | None = None,
    customer_id: str | None = None,
    date: str | None = None,
) -> dict[str, Any]:
    """``data`` of a stack's parent redemption.rollback.succeeded (no voucher; ``amount``
    the children's total, made negative as published)."""
    data = copy.deepcopy(fixture("redemption.rollback.succeeded"))
    data["voucher"] = None
    data["redemption"].update({"id": parent_id, "voucher": None, "redemption": None})
    rollback = data["redemption_rollback"]
    rollback.update(
        {"id": rollback_id, "redemption": parent_id, "amount": -abs(amount), "voucher": None}
    )
    if order_id is not None:
        for holder in (data, data["redemption"], rollback):
            holder["order"]["id"] = order_id
    if customer_id is not None:
        data["customer"]["id"] = customer_id
        data["order"]["customer_id"] = customer_id
        data["redemption"]["customer_id"] = customer_id
        rollback["customer_id"] = customer_id
    if date is not None:
        rollback["date"] = date
    return data


def coupon_redemption(
    redemption_id: str,
    order_id: str = "ord_card_test",
    customer_id: str = "cust_card_test",
    date: str = "2024-02-01T08:45:32.014Z",
) -> dict[str, Any]:
    """``data`` of a redemption.succeeded of the published discount coupon: no card moves."""
    data = copy.deepcopy(fixture("redemption.succeeded"))
    data["customer"]["id"] = customer_id
    data["order"].update({"id": order_id, "customer_id": customer_id})
    data["redemption"].update({"id": redemption_id, "date": date, "customer_id": customer_id})
    data["redemption"]["order"]["id"] = order_id
    return data


def coupon_rollback(
    redemption_id: str,
    rollback_id: str,
    order_id: str = "ord_card_test",
    customer_id: str = "cust_card_test",
    date: str = "2024-02-01T10:23:52.499Z",
) -> dict[str, Any]:
    """``data`` of a redemption.rollback.succeeded of the published discount coupon."""
    data = copy.deepcopy(fixture("redemption.rollback.succeeded"))
    data["customer"]["id"] = customer_id
    data["order"].update({"id": order_id, "customer_id": customer_id})
    data["redemption"].update({"id": redemption_id, "customer_id": customer_id})
    data["redemption"]["order"]["id"] = order_id
    rollback = data["redemption_rollback"]
    rollback.update(
        {"id": rollback_id, "redemption": redemption_id, "date": date, "customer_id": customer_id}
    )
    rollback["order"]["id"] = order_id
    return data


# --- orders ----------------------------------------------------------------------------


def order_event(
    event_type: str,
    order_id: str,
    status: str,
    updated_at: str | None,
    amount: int = 10_000,
    created_at: str = "2024-03-12T08:00:00.000Z",
    customer_id: str | None = None,
) -> dict[str, Any]:
    """``data`` of a ``customer.order.*`` event: the published example with this order as of
    one change (``updated_at`` None: never updated since ``created_at``)."""
    data = copy.deepcopy(fixture(event_type))
    data["order"].update(
        {
            "id": order_id,
            "status": status,
            "amount": amount,
            "total_amount": amount,
            "created_at": created_at,
            "updated_at": updated_at,
        }
    )
    if customer_id is not None:
        data["order"]["customer_id"] = customer_id
        if isinstance(data["order"].get("customer"), dict):
            data["order"]["customer"]["id"] = customer_id
        if isinstance(data.get("customer"), dict):
            data["customer"]["id"] = customer_id
    return data


def with_order_as_of(
    data: dict[str, Any], status: str, created_at: str, updated_at: str | None
) -> dict[str, Any]:
    """A redemption or rollback ``data`` whose order snapshot shows the order as of one
    change: its status then, and that change's ``updated_at`` (None: never updated)."""
    data["order"].update({"status": status, "created_at": created_at, "updated_at": updated_at})
    return data
