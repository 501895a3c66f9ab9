"""Learn the holder of a card whose events never named one: one call per card, ever.

A card no event named the holder of (every card verify heals from the listing, many a gift
card) has its ledger entries on nobody's books. Before it checks the cards, the drift job
asks Voucherify for each such card not asked yet (``GET /v1/vouchers/{id}``: by its id,
since a code can be spent by whoever reads it in a log); a holder the answer names becomes
the card's, every entry of the card moves to it (``sql.SYNC_HOLDER``), and a card no event
reported a balance of takes the answer's. The card is marked asked whatever the answer; a
failed call is tried again on later runs, ``MAX_LOOKUP_FAILURES`` times at most; a holder
an event set is never replaced. ``LOOKUP_BATCH``, ``LOOKUP_TIME_SHARE`` and
``LOOKUP_SHARE`` bound the lookups so that a backlog of cards cannot starve the heals and
the flags' checks. Details: docs/reconciliation.md, "Learning a card's holder".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from psycopg.rows import class_row
from psycopg_pool import ConnectionPool

from config.logs import masked_code, masked_in
from schemas.vocabulary import LedgerKind
from workers.handlers import sql
from workers.jobs.voucherify_api import BudgetExhausted, VoucherifyApi, VoucherifyApiError

log = logging.getLogger(__name__)

LOOKUP_BATCH = 100
"""Cards asked at most per run."""
MAX_LOOKUP_FAILURES = 5
"""Failed calls after which a card is not asked again."""
LOOKUP_SHARE = 0.5
"""Of the calls of the day the drift job may make, the share the lookups may spend."""
LOOKUP_TIME_SHARE = 1 / 3
"""Of the run's time left, the share the lookups may take (at the default pace, a call
every 1.8 s: about 20 cards in a 120 s run)."""
MAX_BALANCE = 2**63 - 1

# The partial index card_balances_to_look_up (migrations/0014_card_lookups.sql) holds
# exactly the cards not asked yet that have no holder.
CARDS_TO_LOOK_UP = """
SELECT voucher_id, voucher_code, kind FROM card_balances
WHERE customer_id IS NULL AND looked_up_at IS NULL AND lookup_failures < %(max_failures)s
ORDER BY lookup_failures, voucher_id
LIMIT %(batch)s
"""

LOCK_CARD = "SELECT customer_id FROM card_balances WHERE voucher_id = %(voucher_id)s FOR UPDATE"

# Asked, whatever the answer. The holder only where none is set (an event may have named
# one since the card was selected); the balance only where no event reported one, as of
# now (the answer is the card as it is now). heard_at stays: no event reached us.
RECORD_LOOKUP = """
UPDATE card_balances SET
    looked_up_at = now(),
    customer_id = COALESCE(customer_id, %(holder_id)s),
    reported_balance = CASE WHEN reported_at IS NULL AND %(balance)s::bigint IS NOT NULL
                            THEN %(balance)s::bigint ELSE reported_balance END,
    reported_at = CASE WHEN reported_at IS NULL AND %(balance)s::bigint IS NOT NULL
                       THEN now() ELSE reported_at END,
    updated_at = now()
WHERE voucher_id = %(voucher_id)s
"""

LOOKUP_FAILED = """
UPDATE card_balances SET lookup_failures = lookup_failures + 1, updated_at = now()
WHERE voucher_id = %(voucher_id)s
"""


@dataclass(frozen=True, slots=True)
class Lookups:
    looked_up: int = 0
    """Cards Voucherify answered for (a 404 included): not asked again."""
    learned: int = 0
    """Of those, the cards whose holder the answer named: their entries moved to it."""


@dataclass(frozen=True, slots=True)
class _Card:
    voucher_id: str
    voucher_code: str | None
    kind: str


def lookup_reserve(api: VoucherifyApi) -> int:
    """The calls of the day the lookups leave to others: what the caller leaves already
    (the window sweep's share), and ``1 - LOOKUP_SHARE`` of the rest."""
    rest = max(0, api.budget.per_day - api.reserve)
    return api.reserve + rest - int(rest * LOOKUP_SHARE)


def learn_holders(
    pool: ConnectionPool, api: VoucherifyApi, deadline: float, batch_size: int = LOOKUP_BATCH
) -> Lookups:
    """Ask Voucherify for the cards with no holder not asked yet; what was learned."""
    now = api.clock()  # the clock the client's waits and retries keep to the deadline by
    until = now + max(0.0, deadline - now) * LOOKUP_TIME_SHARE
    with pool.connection() as conn:
        cursor = conn.cursor(row_factory=class_row(_Card))
        params = {"max_failures": MAX_LOOKUP_FAILURES, "batch": batch_size}
        cards = cursor.execute(CARDS_TO_LOOK_UP, params).fetchall()
    looked_up = learned = 0
    with api.leaving(lookup_reserve(api)):
        for card in cards:
            if api.clock() >= until:
                break
            try:
                voucher = api.get_voucher(card.voucher_id, until)
            except BudgetExhausted:
                break  # the lookups' share is spent: the cards left are asked next run
            except VoucherifyApiError as exc:
                log.warning(
                    "drift.lookup_failed",
                    extra={
                        "voucher_id": card.voucher_id,
                        "voucher_code": masked_code(card.voucher_code),
                        "status": exc.status,
                        "error": masked_in(str(exc), card.voucher_code),
                    },
                )
                if exc.permanent:
                    break  # wrong credentials: no card of this run can do better
                with pool.connection() as conn:
                    conn.execute(LOOKUP_FAILED, {"voucher_id": card.voucher_id})
                continue
            looked_up += 1
            learned += _record(pool, card, voucher)
    return Lookups(looked_up, learned)


def _record(pool: ConnectionPool, card: _Card, voucher: dict[str, Any] | None) -> bool:
    """The answer on the card's row; True when it named the holder of a card without one."""
    holder = _holder(voucher)
    balance = _balance(voucher, card.kind)
    with pool.connection() as conn, conn.transaction():
        row = conn.execute(LOCK_CARD, {"voucher_id": card.voucher_id}).fetchone()
        if row is None:
            return False
        params = {"voucher_id": card.voucher_id, "holder_id": holder, "balance": balance}
        conn.execute(RECORD_LOOKUP, params)
        learned = row[0] is None and holder is not None
        moved = 0
        if learned:
            moved = conn.execute(sql.SYNC_HOLDER, {"voucher_id": card.voucher_id}).rowcount
    extra = {"voucher_id": card.voucher_id, "voucher_code": masked_code(card.voucher_code)}
    if learned:
        log.info("drift.holder_learned", extra={**extra, "customer_id": holder, "entries": moved})
    elif voucher is None:
        log.info("drift.lookup_not_found", extra=extra)
    return learned


def _holder(voucher: dict[str, Any] | None) -> str | None:
    holder = (voucher or {}).get("holder_id")
    return holder if isinstance(holder, str) and holder else None


def _balance(voucher: dict[str, Any] | None, kind: str) -> int | None:
    """The card's balance now, in its own unit; None when the answer has no whole one."""
    part = (voucher or {}).get("gift" if kind == LedgerKind.GIFT_CREDIT else "loyalty_card")
    value = part.get("balance") if isinstance(part, dict) else None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > MAX_BALANCE:
        return None
    return value
