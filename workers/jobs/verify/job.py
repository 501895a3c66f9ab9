"""The verify job: claim what is due, reconcile each redemption, conclude, settle flags.

``reconcile`` asks Voucherify for one redemption (and its latest rollback), applies the
events our records miss (``compare.missing_events``, written by ``translate``) through
``workers.processing`` as events of their own, reads our record again and concludes:
agreement resolves the job's own ``verify_mismatch`` flag, disagreement raises or
refreshes it. A failed-rollback flag is then settled (``_settle_flag``): resolved when
both sides show the rollback, annotated otherwise.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from psycopg.rows import class_row, dict_row
from psycopg_pool import ConnectionPool

from schemas.vocabulary import (
    DeliveryOutcome,
    FlagCategory,
    FlagStatus,
    LedgerEffect,
    RedemptionStatus,
)
from workers import processing
from workers.jobs.result import JobResult
from workers.jobs.verify import claims, compare, translate
from workers.jobs.verify.compare import Ours
from workers.jobs.voucherify_api import VoucherifyApi, VoucherifyApiError

log = logging.getLogger(__name__)

MISMATCH = "verify_mismatch"
"""``failure_code`` of the ``review`` flag the job raises on what it cannot make agree."""

OUR_RECORD = """
SELECT r.status, r.voucher_id,
       EXISTS (SELECT 1 FROM ledger_entries l
               WHERE l.redemption_id = r.redemption_id AND l.effect = %(debit)s) AS has_debit,
       EXISTS (SELECT 1 FROM ledger_entries l
               WHERE l.redemption_id = r.redemption_id AND l.effect = %(restore)s) AS has_restore
FROM redemptions r WHERE r.redemption_id = %(id)s
"""

MARK_VERIFIED = "UPDATE redemptions SET verified_at = now() WHERE redemption_id = %(id)s"

# The arbiter's predicate is the text of the partial index flags_open_verify_mismatch
# (migrations/0003_jobs.sql), not parameters: PostgreSQL infers the index from constants
# only, and a prepared statement's generic plan would find no index at all.
RAISE_MISMATCH = """
INSERT INTO flags (category, redemption_id, voucher_id, failure_code, failure_message,
                   verified_at)
VALUES (%(category)s, %(id)s, %(voucher_id)s, %(mismatch)s, %(message)s, now())
ON CONFLICT (redemption_id) WHERE failure_code = 'verify_mismatch' AND status = 'open'
DO UPDATE SET failure_message = EXCLUDED.failure_message, verified_at = now()
RETURNING (xmax = 0) AS raised
"""

RESOLVE_MISMATCH = """
UPDATE flags SET status = %(resolved)s, resolved_at = now(), note = %(note)s
WHERE redemption_id = %(id)s AND failure_code = %(mismatch)s AND status = %(open)s
"""

RESOLVE_FLAG = """
UPDATE flags SET status = %(resolved)s, resolved_at = now(), note = %(note)s
WHERE id = %(id)s AND status = %(open)s
"""

ANNOTATE_FLAG = "UPDATE flags SET note = %(note)s WHERE id = %(id)s AND status = %(open)s"

FLAG_STATES = {"open": FlagStatus.OPEN, "resolved": FlagStatus.RESOLVED}
LEDGER_EFFECTS = {"debit": LedgerEffect.DEBIT, "restore": LedgerEffect.RESTORE}


@dataclass(frozen=True, slots=True)
class VerifyResult(JobResult):
    checked: int = 0
    applied: int = 0
    flags_resolved: int = 0
    flags_annotated: int = 0
    mismatches: int = 0
    errors: int = 0


@dataclass(frozen=True, slots=True)
class Check:
    """One redemption compared with Voucherify, after healing what could be healed."""

    redemption_id: str
    theirs: str | None  # None: Voucherify does not know it
    ours: Ours | None
    applied: int
    problem: str | None
    rollback_id: str | None = None

    @property
    def agrees(self) -> bool:
        return self.problem is None


Tally = Counter[str]
"""The counts of a run so far, by ``VerifyResult`` field name."""


def verify(
    pool: ConnectionPool,
    api: VoucherifyApi,
    after_seconds: int,
    batch_size: int,
    deadline: float,
) -> VerifyResult:
    """Flags first, then redemptions, each a bounded batch; stops at ``deadline``."""
    tally = Tally()

    def check_flag(flag: claims.FlagClaim) -> None:
        check = reconcile(pool, api, flag.redemption_id, deadline, tally)
        _settle_flag(pool, flag, check, tally)

    def check_redemption(redemption: claims.RedemptionClaim) -> None:
        reconcile(pool, api, redemption.redemption_id, deadline, tally)

    def failed(item: claims.Claimed, exc: VoucherifyApiError) -> None:
        tally["errors"] += 1
        log.error(
            "verify.api_failed", extra={"redemption_id": item.redemption_id, "error": str(exc)}
        )

    due = (after_seconds, batch_size, deadline)
    # Out of time on the flags: the redemptions wait for the next run, unclaimed.
    if claims.work_through(pool, claims.FLAGS, *due, check_flag, failed):
        claims.work_through(pool, claims.REDEMPTIONS, *due, check_redemption, failed)
    result = VerifyResult(**tally)
    if result.applied or result.mismatches or result.errors or result.flags_resolved:
        log.warning("verify.done", extra=result.as_dict())
    return result


def reconcile(
    pool: ConnectionPool,
    api: VoucherifyApi,
    redemption_id: str,
    deadline: float,
    tally: Tally | None = None,
) -> Check:
    """Fetch one redemption, apply what our records miss, say whether they now agree."""
    tally = tally if tally is not None else Tally()
    tally["checked"] += 1
    theirs = api.get_redemption(redemption_id, deadline)
    if theirs is None:
        ours = _ours(pool, redemption_id)
        unknown = "Voucherify does not know this redemption (404)"
        return _conclude(pool, Check(redemption_id, None, ours, 0, unknown), tally)

    status = compare.status_of(theirs.get("status"))
    rollback: dict[str, Any] | None = None
    if status == RedemptionStatus.ROLLED_BACK:
        rollback = _rollback_of(api, theirs, deadline)
    ours = _ours(pool, redemption_id)
    applied = 0
    for event_type in compare.missing_events(theirs, status, rollback, ours):
        data, at = translate.event_data(event_type, theirs, rollback)
        if _apply(pool, redemption_id, event_type, data, at):
            applied += 1
    tally["applied"] += applied
    ours = _ours(pool, redemption_id)
    problem = compare.disagreement(theirs, status, rollback, ours)
    rollback_id = rollback.get("id") if rollback else None
    return _conclude(pool, Check(redemption_id, status, ours, applied, problem, rollback_id), tally)


def _rollback_of(
    api: VoucherifyApi, theirs: dict[str, Any], deadline: float
) -> dict[str, Any] | None:
    """The latest rollback of a rolled-back redemption, in full when Voucherify has it."""
    latest = compare.latest_rollback(theirs)
    if latest is None:
        return None
    full = api.get_redemption(str(latest["id"]), deadline)
    return full if full is not None else latest


def _conclude(pool: ConnectionPool, check: Check, tally: Tally) -> Check:
    """Mark the redemption checked; resolve, or raise or refresh, its mismatch flag."""
    mismatch = {**FLAG_STATES, "id": check.redemption_id, "mismatch": MISMATCH}
    with pool.connection() as conn, conn.transaction():
        conn.execute(MARK_VERIFIED, {"id": check.redemption_id})
        if check.problem is None:
            note = (
                f"resolved by the verify job at {_now()}: our records now agree "
                f"with Voucherify ({check.theirs})"
            )
            conn.execute(RESOLVE_MISMATCH, {**mismatch, "note": note})
            return check
        message = (
            f"Voucherify reports {check.theirs or 'nothing (404)'}; our record: "
            f"{check.ours.status if check.ours else 'none'}: {check.problem}"
        )
        cursor = conn.cursor(row_factory=dict_row)
        flag = cursor.execute(
            RAISE_MISMATCH,
            {
                **mismatch,
                "category": FlagCategory.REVIEW,
                "voucher_id": check.ours.voucher_id if check.ours else None,
                "message": message,
            },
        ).fetchone()
    tally["mismatches"] += 1
    log.error(
        "verify.mismatch",
        extra={
            "redemption_id": check.redemption_id,
            "problem": check.problem,
            "new_flag": bool(flag and flag["raised"]),
        },
    )
    return check


def _settle_flag(pool: ConnectionPool, flag: claims.FlagClaim, check: Check, tally: Tally) -> None:
    """Resolve a failed-rollback flag both sides show rolled back; else note the answer."""
    if flag.failure_code == MISMATCH:
        return  # _conclude resolved or refreshed it already
    ours = check.ours
    rolled_back = (
        check.agrees
        and check.theirs == RedemptionStatus.ROLLED_BACK
        and ours
        and ours.status == RedemptionStatus.ROLLED_BACK
    )
    with pool.connection() as conn, conn.transaction():
        if rolled_back:
            restore = "the restore is in the ledger" if ours and ours.has_restore else "no ledger"
            note = (
                f"resolved by the verify job at {_now()}: Voucherify reports the redemption "
                f"ROLLED_BACK (rollback {check.rollback_id or 'unknown'}); our record is "
                f"ROLLED_BACK and {restore}"
            )
            conn.execute(RESOLVE_FLAG, {**FLAG_STATES, "id": flag.id, "note": note})
            tally["flags_resolved"] += 1
            log.info("verify.flag_resolved", extra={"flag_id": flag.id, "category": flag.category})
            return
        note = (
            f"checked by the verify job at {_now()}: Voucherify reports "
            f"{check.theirs or 'nothing (404)'}; our record: {ours.status if ours else 'none'}"
        )
        conn.execute(ANNOTATE_FLAG, {**FLAG_STATES, "id": flag.id, "note": note})
        tally["flags_annotated"] += 1


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _ours(pool: ConnectionPool, redemption_id: str) -> Ours | None:
    with pool.connection() as conn:
        cursor = conn.cursor(row_factory=class_row(Ours))
        return cursor.execute(OUR_RECORD, {**LEDGER_EFFECTS, "id": redemption_id}).fetchone()


def _apply(
    pool: ConnectionPool,
    redemption_id: str,
    event_type: str,
    data: dict[str, Any],
    at: str | None,
) -> bool:
    """One synthetic event through the inbox and the handlers; True when it was applied."""
    event_id = translate.event_id(redemption_id, event_type)
    body = translate.webhook_body(event_id, event_type, data, at or _now())
    outcome = processing.process_delivery(
        pool, body, f"verify-{uuid.uuid4()}", datetime.now(UTC).isoformat()
    )
    log.warning(
        "verify.applied",
        extra={
            "redemption_id": redemption_id,
            "event_id": event_id,
            "type": event_type,
            "outcome": outcome.status,
            "reason": outcome.reason,
        },
    )
    return outcome.status == DeliveryOutcome.PROCESSED
