"""Balance drift: does each card's reported balance match what our ledger implies?

What we have: the ledger holds one debit per card redemption and one restore per
rollback (amounts signed), and ``card_balances`` the last balance Voucherify reported for
the card (``voucher.gift.balance`` / ``voucher.loyalty_card.balance`` of a redemption
event: the balance right after that operation, at the operation's date). The ledger holds
changes, never an absolute balance, so the comparison needs a starting point:

    baseline      the first balance Voucherify reported to us for the card, and its date
                  (set on insert by a trigger, migrations/0003_jobs.sql)
    implied       baseline + the ledger entries of the card whose operation happened
                  after the baseline's date and no later than the last report's date
                  (a debit happens at its redemption's date, a restore at its rollback's)
    drift         last reported balance - implied

A card drifts when Voucherify moved its balance in a way our ledger does not show: a
redemption or rollback whose webhook we never applied, or one applied twice. Entries
dated before the baseline are already inside it, and entries dated after the last report
are not in it yet, so late or out-of-order webhooks do not count as drift; a webhook that
arrives late within the window makes a drift that the next run sees gone. Operations that
are not redemptions (a gift card top-up, loyalty points earned or expired, a manual
change in the dashboard) also move the balance with no ledger entry: they show up as
drift too, by design, since the ledger no longer mirrors the card.

Each drifting card gets one open ``drift`` flag (a unique index keeps it to one), its
message updated with the latest figures; a flag whose drift is gone is resolved by the
job with a note. When a person resolves a drift flag, the card's baseline moves to its
current report: the difference was explained, and later runs measure from there. The
gauge ``reconciliation_drifting_cards`` gives the number of drifting cards per kind.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import class_row, dict_row
from psycopg_pool import ConnectionPool

from schemas.vocabulary import FlagCategory, FlagStatus, LedgerEffect, LedgerKind
from workers.jobs import metrics
from workers.jobs.result import JobResult

log = logging.getLogger(__name__)

BATCH_SIZE = 500
AUTO_NOTE = "drift gone"
"""How the job's own resolutions start; they do not move the baseline."""
FAILURE_CODE = "balance_drift"

# A person resolved the card's drift flag after the baseline was set: start again from the
# card's current report.
REBASE_RESOLVED = """
UPDATE card_balances c
SET baseline_balance = c.reported_balance, baseline_at = c.reported_at, baseline_set_at = now()
WHERE EXISTS (SELECT 1 FROM flags f
              WHERE f.category = %(drift)s AND f.voucher_id = c.voucher_id
                AND f.status = %(resolved)s AND f.resolved_at > c.baseline_set_at
                AND COALESCE(f.note, '') NOT LIKE %(auto_note)s)
"""

CARD_DRIFTS = """
SELECT c.voucher_id, c.voucher_code, c.kind, c.customer_id, c.reported_balance,
       c.reported_at, c.baseline_balance, c.baseline_at,
       c.baseline_balance + COALESCE((
           SELECT sum(l.amount)
           FROM ledger_entries l LEFT JOIN redemptions r USING (redemption_id)
           WHERE l.voucher_id = c.voucher_id
             AND COALESCE(CASE l.effect WHEN %(debit)s THEN r.redeemed_at ELSE r.rollback_at END,
                          l.created_at) > c.baseline_at
             AND COALESCE(CASE l.effect WHEN %(debit)s THEN r.redeemed_at ELSE r.rollback_at END,
                          l.created_at) <= c.reported_at
       ), 0)::bigint AS implied
FROM card_balances c
WHERE c.voucher_id > %(after)s
ORDER BY c.voucher_id
LIMIT %(batch)s
"""

# The arbiter's predicate is the text of the partial index flags_open_drift
# (migrations/0002_domain.sql), not parameters: PostgreSQL infers the index from constants
# only, and a prepared statement's generic plan would find no index at all.
RAISE_DRIFT = """
INSERT INTO flags (category, voucher_id, failure_code, failure_message)
VALUES (%(drift)s, %(voucher_id)s, %(failure_code)s, %(message)s)
ON CONFLICT (voucher_id) WHERE category = 'drift' AND status = 'open'
DO UPDATE SET failure_message = EXCLUDED.failure_message
RETURNING (xmax = 0) AS raised
"""

RESOLVE_GONE = """
UPDATE flags SET status = %(resolved)s, resolved_at = now(), note = %(note)s
WHERE category = %(drift)s AND voucher_id = %(voucher_id)s AND status = %(open)s
"""

WORDS = {
    "drift": FlagCategory.DRIFT,
    "open": FlagStatus.OPEN,
    "resolved": FlagStatus.RESOLVED,
    "debit": LedgerEffect.DEBIT,
    "failure_code": FAILURE_CODE,
}
"""The vocabulary the statements above take as parameters."""


@dataclass(frozen=True, slots=True)
class DriftResult(JobResult):
    cards: int = 0
    drifting: int = 0
    flags_raised: int = 0
    flags_resolved: int = 0
    rebased: int = 0


@dataclass(frozen=True, slots=True)
class CardDrift:
    """A row of ``CARD_DRIFTS``: a card's last report against what the ledger implies."""

    voucher_id: str
    voucher_code: str | None
    kind: str
    customer_id: str | None
    reported_balance: int
    reported_at: datetime
    baseline_balance: int
    baseline_at: datetime
    implied: int

    @property
    def drift(self) -> int:
        return self.reported_balance - self.implied


@dataclass
class _Tally:
    cards: int = 0
    drifting: int = 0
    flags_raised: int = 0
    flags_resolved: int = 0
    by_kind: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LedgerKind, 0))


def check_drift(pool: ConnectionPool, deadline: float, batch_size: int = BATCH_SIZE) -> DriftResult:
    tally = _Tally()
    with pool.connection() as conn, conn.transaction():
        rebased = conn.execute(REBASE_RESOLVED, {**WORDS, "auto_note": AUTO_NOTE + "%"}).rowcount
    after = ""
    complete = False
    while time.monotonic() < deadline:
        with pool.connection() as conn, conn.transaction():
            cursor = conn.cursor(row_factory=class_row(CardDrift))
            cards = cursor.execute(
                CARD_DRIFTS, {**WORDS, "after": after, "batch": batch_size}
            ).fetchall()
            for card in cards:
                _check_card(conn, card, tally)
        if len(cards) < batch_size:
            complete = True
            break
        after = cards[-1].voucher_id
    if complete:  # a partial run would under-report: keep the last full figure
        for kind, n in tally.by_kind.items():
            metrics.DRIFTING_CARDS.labels(kind).set(n)
    return DriftResult(
        cards=tally.cards,
        drifting=tally.drifting,
        flags_raised=tally.flags_raised,
        flags_resolved=tally.flags_resolved,
        rebased=rebased,
    )


def _check_card(conn: psycopg.Connection[Any], card: CardDrift, tally: _Tally) -> None:
    """Resolve the card's drift flag when its drift is gone; raise or refresh it when not."""
    tally.cards += 1
    reported_at = card.reported_at.isoformat()
    if card.drift == 0:
        note = (
            f"{AUTO_NOTE}: Voucherify's {card.reported_balance} at {reported_at} "
            "is what the ledger implies"
        )
        params = {**WORDS, "voucher_id": card.voucher_id, "note": note}
        tally.flags_resolved += conn.execute(RESOLVE_GONE, params).rowcount
        return
    tally.drifting += 1
    tally.by_kind[card.kind] = tally.by_kind.get(card.kind, 0) + 1
    message = (
        f"Voucherify reports {card.reported_balance} at {reported_at}; the ledger "
        f"implies {card.implied} ({card.baseline_balance} at {card.baseline_at.isoformat()} "
        f"plus {card.implied - card.baseline_balance} since): difference {card.drift:+d}"
    )
    params = {**WORDS, "voucher_id": card.voucher_id, "message": message}
    flag = conn.cursor(row_factory=dict_row).execute(RAISE_DRIFT, params).fetchone()
    if flag and flag["raised"]:
        tally.flags_raised += 1
        metrics.DRIFT_FLAGS.labels(card.kind).inc()
        log.error(
            "drift.flagged",
            extra={
                "voucher_id": card.voucher_id,
                "voucher_code": card.voucher_code,
                "customer_id": card.customer_id,
                "kind": card.kind,
                "drift": card.drift,
            },
        )
