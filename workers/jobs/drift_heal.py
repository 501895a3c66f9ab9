"""Heal a drifting card from Voucherify's own list of its transactions.

When the API is configured, the drift job asks ``GET /v1/vouchers/{code}/transactions``
(newest first, 100 a page, cursor ``starting_after_id``) for a card whose movements do not
add up, back to the card's first measured movement, and applies each transaction the
ledger does not hold as the ``voucher.{gift,loyalty_card}.transaction.created`` webhook
Voucherify would have sent: through ``workers.processing.process_delivery``, so it is in
the inbox like a delivery, deduplicated by its event id (``drift:<transaction id>``),
marked by its ``source`` (``{"id": "drift", "object": "reconciliation"}``), and put in the
ledger by the same handler, keyed by the same transaction id as the real webhook.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from psycopg_pool import ConnectionPool

from schemas.vocabulary import DeliveryOutcome, LedgerKind
from workers import processing
from workers.jobs import synthetic

log = logging.getLogger(__name__)

MAX_PAGES = 20
"""At most 2,000 transactions back per card and run: the quota is the shop's."""

KNOWN_TRANSACTIONS = """
SELECT transaction_id FROM ledger_entries WHERE transaction_id = ANY(%(ids)s)
"""


class TransactionLister(Protocol):
    def list_voucher_transactions(
        self, code: str, deadline: float, starting_after_id: str | None = None
    ) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Card:
    voucher_id: str
    voucher_code: str | None
    kind: str
    holder_id: str | None
    since: datetime
    """The card's first measured movement: older transactions cannot be the gap."""


def event_type_of(kind: str) -> str:
    family = "gift" if kind == LedgerKind.GIFT_CREDIT else "loyalty_card"
    return f"voucher.{family}.transaction.created"


def webhook_body(card: Card, transaction: dict[str, Any], job: str = "drift") -> tuple[str, str]:
    """(event id, raw body) of the transaction webhook Voucherify would have sent; the
    ``job`` that learned of it names its source and its event id (``<job>:<transaction>``)."""
    event_type = event_type_of(card.kind)
    event_id = f"{job}:{transaction['id']}"
    created_at = transaction.get("created_at") or datetime.now(UTC).isoformat()
    data = {
        "transaction": transaction,
        "voucher": {"id": card.voucher_id, "code": card.voucher_code, "holder_id": card.holder_id},
        "holder": {"id": card.holder_id} if card.holder_id else None,
    }
    return event_id, synthetic.webhook_body(job, event_id, event_type, data, created_at)


def _created(transaction: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(str(transaction.get("created_at")).replace("Z", "+00:00"))
    except ValueError:
        return None


def missing_transactions(
    pool: ConnectionPool, api: TransactionLister, card: Card, deadline: float
) -> list[dict[str, Any]]:
    """The card's transactions since its first measured movement that the ledger lacks."""
    found: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(MAX_PAGES):
        if time.monotonic() >= deadline:
            break
        page = api.list_voucher_transactions(card.voucher_code or card.voucher_id, deadline, cursor)
        listed = [t for t in page.get("data") or [] if isinstance(t, dict) and t.get("id")]
        found.extend(t for t in listed if (_created(t) or card.since) >= card.since)
        older = any((_created(t) or card.since) < card.since for t in listed)
        cursor = page.get("more_starting_after")
        if older or not page.get("has_more") or not cursor:
            break
    if not found:
        return []
    with pool.connection() as conn:
        ids = [t["id"] for t in found]
        known = {row[0] for row in conn.execute(KNOWN_TRANSACTIONS, {"ids": ids}).fetchall()}
    return [t for t in reversed(found) if t["id"] not in known]  # oldest first


def heal_card(pool: ConnectionPool, api: TransactionLister, card: Card, deadline: float) -> int:
    """Apply the card's missing transactions; the number applied."""
    applied = 0
    for transaction in missing_transactions(pool, api, card, deadline):
        event_id, body = webhook_body(card, transaction)
        outcome = processing.process_delivery(
            pool, body, f"drift-{uuid.uuid4()}", datetime.now(UTC).isoformat()
        )
        log.warning(
            "drift.healed",
            extra={
                "voucher_id": card.voucher_id,
                "transaction_id": transaction["id"],
                "event_id": event_id,
                "outcome": outcome.status,
                "reason": outcome.reason,
            },
        )
        applied += outcome.status == DeliveryOutcome.PROCESSED
    return applied
