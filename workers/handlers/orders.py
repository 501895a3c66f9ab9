"""Orders: the row of each order follows its latest change (``sql.UPSERT_ORDER``), from
Voucherify's order events and from the order inside every redemption and rollback event."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg

from schemas.redemption import Order, OrderEvent, load_order_event
from workers.handlers import sql
from workers.registry import handles

ORDER_EVENT_TYPES = (
    "customer.order.created",
    "customer.order.paid",
    "customer.order.updated",
    "customer.order.canceled",
)


def record_order(
    conn: psycopg.Connection[Any],
    order: Order | None,
    *,
    customer_id: str | None,
    at: datetime | None,
    event_id: str,
    event_type: str,
) -> None:
    """One change of ``order``, dated by its own ``updated_at`` (else its ``created_at``),
    else ``at``: the date of the event that carries it."""
    if order is None or not order.id:
        return  # an order without an id cannot be recorded (the schema allows one)
    conn.execute(
        sql.UPSERT_ORDER,
        {
            "order_id": order.id,
            "status": order.status,
            "amount": order.amount,
            "total_amount": order.total_amount,
            "customer_id": order.customer_id or customer_id,
            "at": order.updated_at or at,
            "event_id": event_id,
            "event_type": event_type,
        },
    )


def order_changed(event: OrderEvent, conn: psycopg.Connection[Any]) -> None:
    record_order(
        conn,
        event.order,
        customer_id=event.customer_id,
        at=event.created_at,
        event_id=event.event_id,
        event_type=event.type,
    )


for _type in ORDER_EVENT_TYPES:
    handles(_type, load_order_event)(order_changed)
