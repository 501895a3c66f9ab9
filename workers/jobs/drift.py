"""Balance drift: does each card's ledger add up to the balance Voucherify reports?

The ledger holds every movement of a card once, with its time, its signed amount and,
where the event reported it, the balance right after it. For a quiet card (no event of it
for ``quiet_seconds``: a webhook still on its way looks like a lost one), the balance
before its first reporting movement plus every movement up to its last one must equal
that last report; what is left, less a gap a person accepted (``accepted_drift``), is the
drift: the amount of the movements missing from the ledger, whatever the order and the
duplicates of the webhooks. A drifting card gets one open ``drift`` flag, which the job
resolves itself once the gap closes. With the API, the job first learns the holder of the
cards without one (``workers.jobs.card_lookup``) and heals a drifting card from its
transactions (``workers.jobs.drift_heal``) before it flags what is still missing. The
model and its limits: docs/reconciliation.md, "Balance drift".
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

from config.logs import masked_code, masked_in
from schemas.vocabulary import FlagCategory, FlagStatus, LedgerKind
from workers.jobs import metrics
from workers.jobs.card_lookup import Lookups, learn_holders
from workers.jobs.drift_heal import Card as HealCard
from workers.jobs.drift_heal import TransactionLister, heal_card
from workers.jobs.result import JobResult
from workers.jobs.voucherify_api import BudgetExhausted, VoucherifyApi, VoucherifyApiError

log = logging.getLogger(__name__)

BATCH_SIZE = 500
QUIET_SECONDS = 900
"""How long a card must have been quiet (no event of it reached us) before it is checked:
the time a late webhook has to arrive before its absence counts as a gap."""
AUTO_NOTE = "drift gone"
"""How the job's own resolutions start; they do not move the accepted gap."""
FAILURE_CODE = "balance_drift"

# Each card of the batch with its first and last reporting movement, the movements in
# between (inclusive: every movement at the first and the last instant), and whether a
# person resolved its drift flag since the gap was last accepted. Cards with no movement
# yet come too (with NULLs), so a short batch means the end of the table.
CARD_DRIFTS = """
SELECT c.voucher_id, c.voucher_code, c.kind, c.customer_id, c.accepted_drift,
       c.heard_at <= now() - make_interval(secs => %(quiet)s) AS quiet,
       (c.heal_next_at IS NULL OR c.heal_next_at <= now()) AS heal_due,
       f.moved_at AS first_at, f.balance_after - f.amount AS start_balance,
       l.moved_at AS last_at, l.balance_after AS last_balance,
       (SELECT COALESCE(sum(e.amount), 0) FROM ledger_entries e
        WHERE e.voucher_id = c.voucher_id
          AND e.moved_at >= f.moved_at AND e.moved_at <= l.moved_at)::bigint AS moved,
       EXISTS (SELECT 1 FROM flags g
               WHERE g.category = %(drift)s AND g.voucher_id = c.voucher_id
                 AND g.status = %(resolved)s AND g.resolved_at > c.accepted_at
                 AND COALESCE(g.note, '') NOT LIKE %(auto_note)s) AS accepted_by_person
FROM card_balances c
LEFT JOIN LATERAL (
    SELECT e.id, e.moved_at, e.amount, e.balance_after FROM ledger_entries e
    WHERE e.voucher_id = c.voucher_id AND e.balance_after IS NOT NULL
    ORDER BY e.moved_at,
             EXISTS (SELECT 1 FROM ledger_entries p
                     WHERE p.voucher_id = e.voucher_id AND p.moved_at = e.moved_at
                       AND p.id <> e.id AND p.balance_after = e.balance_after - e.amount),
             e.id
    LIMIT 1) f ON true
LEFT JOIN LATERAL (
    SELECT e.id, e.moved_at, e.balance_after FROM ledger_entries e
    WHERE e.voucher_id = c.voucher_id AND e.balance_after IS NOT NULL
    ORDER BY e.moved_at DESC,
             EXISTS (SELECT 1 FROM ledger_entries n
                     WHERE n.voucher_id = e.voucher_id AND n.moved_at = e.moved_at
                       AND n.id <> e.id AND n.balance_after - n.amount = e.balance_after),
             e.id DESC
    LIMIT 1) l ON true
WHERE c.voucher_id > %(after)s
  AND (%(only)s::text[] IS NULL OR c.voucher_id = ANY(%(only)s::text[]))
ORDER BY c.voucher_id
LIMIT %(batch)s
"""

# A heal that left the card drifting backs off (migrations/0011_api_budget.sql): the next
# try waits HEAL_BACKOFF_SECONDS x 2^failures, at most MAX_HEAL_BACKOFF_SECONDS.
HEAL_FAILED = """
UPDATE card_balances
SET heal_failures = heal_failures + 1,
    heal_next_at = now() + make_interval(
        secs => LEAST(%(base)s * 2 ^ LEAST(heal_failures, 20), %(cap)s))
WHERE voucher_id = %(voucher_id)s
"""
HEAL_DONE = """
UPDATE card_balances SET heal_failures = 0, heal_next_at = NULL
WHERE voucher_id = %(voucher_id)s AND (heal_failures > 0 OR heal_next_at IS NOT NULL)
"""
HEAL_BACKOFF_SECONDS = 3600
MAX_HEAL_BACKOFF_SECONDS = 7 * 86400

ACCEPT_GAP = """
UPDATE card_balances SET accepted_drift = %(gap)s, accepted_at = now()
WHERE voucher_id = %(voucher_id)s
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
    """Cards whose gap a person accepted (resolved their drift flag) since the last run."""
    waiting: int = 0
    """Cards heard of within ``quiet_seconds``: checked on a later run."""
    unmeasured: int = 0
    """Cards no event has reported a balance of yet: nothing to measure them by."""
    healed: int = 0
    """Transactions listed from Voucherify's API and applied to close a gap."""
    looked_up: int = 0
    """Cards without a holder Voucherify was asked for (``GET /v1/vouchers/{id}``)."""
    holders_learned: int = 0
    """Of those, the cards whose holder it named: their entries are the holder's now."""


@dataclass(frozen=True, slots=True)
class CardDrift:
    """A row of ``CARD_DRIFTS``: a card's movements from its first report to its last."""

    voucher_id: str
    voucher_code: str | None
    kind: str
    customer_id: str | None
    accepted_drift: int
    quiet: bool
    heal_due: bool
    first_at: datetime | None
    start_balance: int | None
    last_at: datetime | None
    last_balance: int | None
    moved: int | None
    accepted_by_person: bool

    @property
    def measured(self) -> bool:
        return self.start_balance is not None and self.last_balance is not None

    @property
    def implied(self) -> int:
        return (self.start_balance or 0) + (self.moved or 0)

    @property
    def gap(self) -> int:
        """What Voucherify's balance has that the ledger's movements do not explain."""
        return (self.last_balance or 0) - self.implied

    @property
    def drift(self) -> int:
        """The gap less what a person accepted; none once the ledger explains Voucherify's
        balance exactly (an accepted gap that the late movement closed is no drift)."""
        return 0 if self.gap == 0 else self.gap - self.accepted_drift


@dataclass
class _Tally:
    cards: int = 0
    drifting: int = 0
    flags_raised: int = 0
    flags_resolved: int = 0
    rebased: int = 0
    waiting: int = 0
    unmeasured: int = 0
    healed: int = 0
    by_kind: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LedgerKind, 0))


def check_drift(
    pool: ConnectionPool,
    deadline: float,
    batch_size: int = BATCH_SIZE,
    quiet_seconds: float = QUIET_SECONDS,
    api: VoucherifyApi | None = None,
) -> DriftResult:
    """Check every quiet card; with ``api``, learn the holder of the cards without one
    (``workers.jobs.card_lookup``) first, and heal a drifting card from its transactions
    (``workers.jobs.drift_heal``) before flagging what is still missing."""
    lookups = learn_holders(pool, api, deadline) if api is not None else Lookups()
    tally = _Tally()
    after = ""
    complete = False
    params = {
        **WORDS,
        "auto_note": AUTO_NOTE + "%",
        "quiet": quiet_seconds,
        "batch": batch_size,
        "only": None,
    }
    while time.monotonic() < deadline:
        deferred: list[CardDrift] = []
        with pool.connection() as conn, conn.transaction():
            cursor = conn.cursor(row_factory=class_row(CardDrift))
            cards = cursor.execute(CARD_DRIFTS, {**params, "after": after}).fetchall()
            for card in cards:
                if _check_card(conn, card, tally, heal=api is not None):
                    deferred.append(card)
        if api is not None and deferred:
            _heal_and_recheck(pool, api, deferred, deadline, tally, params)
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
        rebased=tally.rebased,
        waiting=tally.waiting,
        unmeasured=tally.unmeasured,
        healed=tally.healed,
        looked_up=lookups.looked_up,
        holders_learned=lookups.learned,
    )


def _heal_and_recheck(
    pool: ConnectionPool,
    api: TransactionLister,
    cards: list[CardDrift],
    deadline: float,
    tally: _Tally,
    params: dict[str, Any],
) -> None:
    """Apply what Voucherify lists and the ledger lacks, then measure those cards again
    (just healed from the API: no quiet period) and flag what is still missing."""
    tried: list[str] = []
    for card in cards:
        assert card.first_at is not None
        holder = card.customer_id
        target = HealCard(card.voucher_id, card.voucher_code, card.kind, holder, card.first_at)
        try:
            tally.healed += heal_card(pool, api, target, deadline)
        except BudgetExhausted:
            break  # the budget is spent: the cards left are flagged now, healed next run
        except VoucherifyApiError as exc:
            log.warning(
                "drift.heal_failed",
                extra={
                    "voucher_id": card.voucher_id,
                    "voucher_code": masked_code(card.voucher_code),
                    "error": masked_in(str(exc), card.voucher_code),  # its path has the code
                },
            )
        tried.append(card.voucher_id)
    only = [card.voucher_id for card in cards]
    recheck = {**params, "quiet": 0, "only": only, "after": "", "batch": len(only)}
    with pool.connection() as conn, conn.transaction():
        cursor = conn.cursor(row_factory=class_row(CardDrift))
        for card in cursor.execute(CARD_DRIFTS, recheck).fetchall():
            _check_card(conn, card, tally, heal=False, counted=True)
            if card.voucher_id in tried:
                backoff = {
                    "voucher_id": card.voucher_id,
                    "base": HEAL_BACKOFF_SECONDS,
                    "cap": MAX_HEAL_BACKOFF_SECONDS,
                }
                conn.execute(HEAL_DONE if card.drift == 0 else HEAL_FAILED, backoff)


def _check_card(
    conn: psycopg.Connection[Any],
    card: CardDrift,
    tally: _Tally,
    heal: bool = False,
    counted: bool = False,
) -> bool:
    """Resolve the card's drift flag when its gap is closed; raise or refresh it when not.
    With ``heal``, a drifting card is not flagged yet: True says it is to be healed first
    (and checked again, ``counted`` already)."""
    if not card.measured:
        if not counted:
            tally.unmeasured += 1  # no movement reported its balance yet: counted, not checked
        return False
    if not card.quiet:
        tally.waiting += 1  # a webhook may still be on its way: check it when quiet
        return False
    if not counted:
        tally.cards += 1
    if card.accepted_by_person:
        conn.execute(ACCEPT_GAP, {"voucher_id": card.voucher_id, "gap": card.gap})
        tally.rebased += 1
        return False
    if card.gap == 0 and card.accepted_drift:
        # The movement whose absence a person accepted has arrived: nothing is accepted now.
        conn.execute(ACCEPT_GAP, {"voucher_id": card.voucher_id, "gap": 0})
        log.info(
            "drift.accepted_gap_closed",
            extra={"voucher_id": card.voucher_id, "accepted_drift": card.accepted_drift},
        )
    if heal and card.drift != 0 and card.heal_due:
        return True  # not healed again before its back-off has passed: flagged below
    assert card.first_at is not None
    assert card.last_at is not None
    if card.drift == 0:
        note = (
            f"{AUTO_NOTE}: the ledger's movements add up to Voucherify's {card.last_balance}"
            f" at {card.last_at.isoformat()}"
        )
        params = {**WORDS, "voucher_id": card.voucher_id, "note": note}
        tally.flags_resolved += conn.execute(RESOLVE_GONE, params).rowcount
        return False
    tally.drifting += 1
    tally.by_kind[card.kind] = tally.by_kind.get(card.kind, 0) + 1
    accepted = f", less {card.accepted_drift:+d} accepted" if card.accepted_drift else ""
    message = (
        f"card {masked_code(card.voucher_code) or card.voucher_id} ({card.voucher_id}): "
        "Voucherify reports "
        f"{card.last_balance} at {card.last_at.isoformat()}; the ledger implies {card.implied}"
        f" ({card.start_balance} before its movement at {card.first_at.isoformat()} plus "
        f"{card.moved} moved since{accepted}): difference {card.drift:+d}"
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
                "voucher_code": masked_code(card.voucher_code),
                "customer_id": card.customer_id,
                "kind": card.kind,
                "drift": card.drift,
            },
        )
    return False
