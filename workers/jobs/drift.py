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
from dataclasses import asdict, dataclass

from psycopg_pool import ConnectionPool

from workers.jobs import metrics

log = logging.getLogger(__name__)

BATCH_SIZE = 500
KINDS = ("gift_credit", "loyalty_points")
AUTO_NOTE = "drift gone"
"""How the job's own resolutions start; they do not move the baseline."""

# A person resolved the card's drift flag after the baseline was set: start again from the
# card's current report.
REBASE_RESOLVED = """
UPDATE card_balances c
SET baseline_balance = c.reported_balance, baseline_at = c.reported_at, baseline_set_at = now()
WHERE EXISTS (SELECT 1 FROM flags f
              WHERE f.category = 'drift' AND f.voucher_id = c.voucher_id
                AND f.status = 'resolved' AND f.resolved_at > c.baseline_set_at
                AND COALESCE(f.note, '') NOT LIKE %(auto_note)s)
"""

CARD_DRIFTS = """
SELECT c.voucher_id, c.voucher_code, c.kind, c.customer_id, c.reported_balance,
       c.reported_at, c.baseline_balance, c.baseline_at,
       c.baseline_balance + COALESCE((
           SELECT sum(l.amount)
           FROM ledger_entries l LEFT JOIN redemptions r USING (redemption_id)
           WHERE l.voucher_id = c.voucher_id
             AND COALESCE(CASE l.effect WHEN 'debit' THEN r.redeemed_at ELSE r.rollback_at END,
                          l.created_at) > c.baseline_at
             AND COALESCE(CASE l.effect WHEN 'debit' THEN r.redeemed_at ELSE r.rollback_at END,
                          l.created_at) <= c.reported_at
       ), 0)::bigint AS implied
FROM card_balances c
WHERE c.voucher_id > %(after)s
ORDER BY c.voucher_id
LIMIT %(batch)s
"""

RAISE_DRIFT = """
INSERT INTO flags (category, voucher_id, failure_code, failure_message)
VALUES ('drift', %(voucher_id)s, 'balance_drift', %(message)s)
ON CONFLICT (voucher_id) WHERE category = 'drift' AND status = 'open'
DO UPDATE SET failure_message = EXCLUDED.failure_message
RETURNING (xmax = 0) AS raised
"""

RESOLVE_GONE = """
UPDATE flags SET status = 'resolved', resolved_at = now(), note = %(note)s
WHERE category = 'drift' AND voucher_id = %(voucher_id)s AND status = 'open'
"""


@dataclass(frozen=True, slots=True)
class DriftResult:
    cards: int = 0
    drifting: int = 0
    flags_raised: int = 0
    flags_resolved: int = 0
    rebased: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def check_drift(pool: ConnectionPool, deadline: float, batch_size: int = BATCH_SIZE) -> DriftResult:
    cards = drifting = raised = resolved = 0
    by_kind = dict.fromkeys(KINDS, 0)
    with pool.connection() as conn, conn.transaction():
        rebased = conn.execute(REBASE_RESOLVED, {"auto_note": AUTO_NOTE + "%"}).rowcount
    after = ""
    complete = False
    while time.monotonic() < deadline:
        with pool.connection() as conn, conn.transaction():
            rows = conn.execute(CARD_DRIFTS, {"after": after, "batch": batch_size}).fetchall()
            for row in rows:
                voucher_id, code, kind, customer_id, reported, reported_at = row[:6]
                baseline, baseline_at, implied = row[6:]
                cards += 1
                drift = reported - implied
                if drift == 0:
                    resolved += conn.execute(
                        RESOLVE_GONE,
                        {
                            "voucher_id": voucher_id,
                            "note": f"{AUTO_NOTE}: Voucherify's {reported} at "
                            f"{reported_at.isoformat()} is what the ledger implies",
                        },
                    ).rowcount
                    continue
                drifting += 1
                by_kind[kind] = by_kind.get(kind, 0) + 1
                message = (
                    f"Voucherify reports {reported} at {reported_at.isoformat()}; the ledger "
                    f"implies {implied} ({baseline} at {baseline_at.isoformat()} plus "
                    f"{implied - baseline} since): difference {drift:+d}"
                )
                flag = conn.execute(
                    RAISE_DRIFT, {"voucher_id": voucher_id, "message": message}
                ).fetchone()
                if flag and flag[0]:
                    raised += 1
                    metrics.DRIFT_FLAGS.labels(kind).inc()
                    log.error(
                        "drift.flagged",
                        extra={
                            "voucher_id": voucher_id,
                            "voucher_code": code,
                            "customer_id": customer_id,
                            "kind": kind,
                            "drift": drift,
                        },
                    )
        if len(rows) < batch_size:
            complete = True
            break
        after = rows[-1][0]
    if complete:  # a partial run would under-report: keep the last full figure
        for kind, n in by_kind.items():
            metrics.DRIFTING_CARDS.labels(kind).set(n)
    return DriftResult(
        cards=cards,
        drifting=drifting,
        flags_raised=raised,
        flags_resolved=resolved,
        rebased=rebased,
    )
