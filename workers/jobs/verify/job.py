"""The verify job: sweep the listing's window, then settle the failed-rollback flags.

The window first: it is what finds lost webhooks, and the flags get what the budget
keeps beyond the sweep's share. Flags (``claims.FLAGS``, few): ``reconcile`` asks
Voucherify for the redemption (and its successful rollback), applies the events our
records miss (``compare.missing_events``, written by ``translate``) through
``workers.processing`` as events of their own, reads our record again and concludes;
``_settle_flag`` then resolves or annotates the flag.

Redemptions (``window.sweep``): listed by creation time, 100 a page, compared with our
rows page by page, healed through the same ``_heal``. Agreement resolves the job's own
``verify_mismatch`` flag, disagreement raises or refreshes it (``_conclude``).

Every call is within the API budget (``voucherify_api.Budget``): when it is spent the run
stops where it is, and the next run goes on from there.
"""

from __future__ import annotations

import contextlib
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
from workers.jobs.verify import claims, compare, translate, window
from workers.jobs.verify.compare import Ours
from workers.jobs.voucherify_api import (
    BudgetExhausted,
    VoucherifyApi,
    VoucherifyApiError,
    sweep_reserve,
)

log = logging.getLogger(__name__)

MISMATCH = "verify_mismatch"
RECHECK_AFTER_SECONDS = 3600
"""When a mismatch flag the job raises is first checked again (``VERIFY_AFTER_SECONDS``)."""
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
                   verified_at, next_check_at)
VALUES (%(category)s, %(id)s, %(voucher_id)s, %(mismatch)s, %(message)s, now(),
        now() + make_interval(secs => %(recheck_after)s))
ON CONFLICT (redemption_id) WHERE failure_code = 'verify_mismatch' AND status = 'open'
DO UPDATE SET failure_message = EXCLUDED.failure_message, verified_at = now(),
              next_check_at = GREATEST(flags.next_check_at, EXCLUDED.next_check_at)
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
    """Flags' redemptions fetched and compared."""
    listed: int = 0
    """Items of the listing (redemptions and rollbacks) compared."""
    pages: int = 0
    windows_split: int = 0
    applied: int = 0
    orders_healed: int = 0
    """Order changes the listing showed and our rows lacked, applied (of ``applied``)."""
    failed_rollbacks_flagged: int = 0
    """Failed rollbacks of the listing with no flag here, flagged (of ``applied``)."""
    flags_resolved: int = 0
    flags_annotated: int = 0
    mismatches: int = 0
    errors: int = 0
    calls: int = 0
    """Calls made to Voucherify's API."""
    skipped_for_budget: int = 0
    """1 when the budget stopped the run (the rest waits for the next run)."""


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
    overlap_seconds: int,
    batch_size: int,
    deadline: float,
    now: datetime | None = None,
) -> VerifyResult:
    """The listing's window first (what finds lost webhooks), then the flags due (a
    bounded batch, within what the budget keeps beyond the sweep's share); stops at
    ``deadline``.

    ``now``: where the window ends, less ``after_seconds`` (None: the database's clock).
    """
    tally = Tally()

    def check_flag(flag: claims.FlagClaim) -> None:
        check = reconcile(pool, api, flag.redemption_id, deadline, tally, after_seconds)
        _settle_flag(pool, flag, check, tally)

    def failed(item: claims.Claimed, exc: VoucherifyApiError) -> None:
        tally["errors"] += 1
        log.error(
            "verify.api_failed", extra={"redemption_id": item.redemption_id, "error": str(exc)}
        )

    def heal(found: window.Heal) -> None:
        _heal(pool, found, tally, after_seconds)

    def apply(event: window.Synthetic) -> bool:
        return _apply(pool, event)

    calls_before = api.calls
    started = datetime.now(UTC)
    try:
        swept = window.sweep(
            pool, api, after_seconds, overlap_seconds, deadline, heal, tally, apply, now=now
        )
    except BudgetExhausted:
        swept = False
    except VoucherifyApiError as exc:
        if exc.permanent:
            raise
        swept = True  # the listing failed this time: the flags may still be checked
        tally["errors"] += 1
        log.error("verify.listing_failed", extra={"error": str(exc)})
    if swept and not _budget_spent(api):
        with api.leaving(sweep_reserve(api)), contextlib.suppress(BudgetExhausted):
            claims.work_through(
                pool,
                claims.FLAGS,
                after_seconds,
                batch_size,
                deadline,
                check_flag,
                failed,
                not_since=started,
            )
    tally["calls"] = api.calls - calls_before
    tally["skipped_for_budget"] = int(_budget_spent(api))
    result = VerifyResult(**tally)
    if result.applied or result.mismatches or result.errors or result.flags_resolved:
        log.warning("verify.done", extra=result.as_dict())
    return result


def _budget_spent(api: VoucherifyApi) -> bool:
    return api.skipped > 0


def reconcile(
    pool: ConnectionPool,
    api: VoucherifyApi,
    redemption_id: str,
    deadline: float,
    tally: Tally | None = None,
    recheck_after: int = RECHECK_AFTER_SECONDS,
) -> Check:
    """Fetch one redemption, apply what our records miss, say whether they now agree."""
    tally = tally if tally is not None else Tally()
    tally["checked"] += 1
    theirs = api.get_redemption(redemption_id, deadline)
    if theirs is None:
        ours = _ours(pool, redemption_id)
        unknown = "Voucherify does not know this redemption (404)"
        check = Check(redemption_id, None, ours, 0, unknown)
        return _conclude(pool, check, tally, recheck_after)

    status = compare.status_from(theirs)
    rollback: dict[str, Any] | None = None
    if status == RedemptionStatus.ROLLED_BACK or (
        status == RedemptionStatus.SUCCEEDED and compare.rollbacks_newest_first(theirs)
    ):
        rollback = _rollback_of(api, theirs, deadline)
        if rollback is not None:
            status = RedemptionStatus.ROLLED_BACK  # an answer without status: its rollback says
    return heal_from(pool, redemption_id, theirs, status, rollback, tally, recheck_after)


def heal_from(
    pool: ConnectionPool,
    redemption_id: str,
    theirs: dict[str, Any],
    status: str | None,
    rollback: dict[str, Any] | None,
    tally: Tally | None = None,
    recheck_after: int = RECHECK_AFTER_SECONDS,
) -> Check:
    """Apply what our records miss of a redemption Voucherify answered (and its successful
    rollback, if any), say whether they now agree (also for a flag's action's answer)."""
    ours = _ours(pool, redemption_id)
    events = compare.missing_events(theirs, status, rollback, ours)
    found = window.Heal(
        redemption_id,
        theirs,
        status,
        rollback,
        events,
        lambda after: compare.disagreement(theirs, status, rollback, after),
    )
    return _heal(pool, found, tally if tally is not None else Tally(), recheck_after)


def _heal(
    pool: ConnectionPool,
    found: window.Heal,
    tally: Tally,
    recheck_after: int = RECHECK_AFTER_SECONDS,
) -> Check:
    """Apply the events our records miss, read our record again, conclude."""
    applied = 0
    for event_type in found.events:
        data, at = translate.event_data(event_type, found.theirs, found.rollback)
        event_id = translate.event_id(found.redemption_id, event_type)
        if _apply(pool, window.Synthetic(event_id, event_type, data, at, found.redemption_id)):
            applied += 1
    tally["applied"] += applied
    ours = _ours(pool, found.redemption_id)
    rollback_id = found.rollback.get("id") if found.rollback else None
    check = Check(
        found.redemption_id, found.status, ours, applied, found.problem(ours), rollback_id
    )
    return _conclude(pool, check, tally, recheck_after)


def _rollback_of(
    api: VoucherifyApi, theirs: dict[str, Any], deadline: float
) -> dict[str, Any] | None:
    """The rollback that succeeded, newest first; a failed attempt is no rollback."""
    for listed in compare.rollbacks_newest_first(theirs):
        full = api.get_redemption(str(listed["id"]), deadline)
        if full is not None and compare.succeeded(full):
            return full
    return None


def _conclude(
    pool: ConnectionPool, check: Check, tally: Tally, recheck_after: int = RECHECK_AFTER_SECONDS
) -> Check:
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
                "recheck_after": recheck_after,
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
            # A lost rollback's flag is already_rolled_back by now: the healing moved our
            # record to ROLLED_BACK (migrations/0007).
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


def _apply(pool: ConnectionPool, event: window.Synthetic) -> bool:
    """One synthetic event through the inbox and the handlers; True when it was applied."""
    body = translate.webhook_body(event.event_id, event.type, event.data, event.at or _now())
    outcome = processing.process_delivery(
        pool, body, f"verify-{uuid.uuid4()}", datetime.now(UTC).isoformat()
    )
    log.warning(
        "verify.applied",
        extra={
            "subject": event.subject,
            "event_id": event.event_id,
            "type": event.type,
            "outcome": outcome.status,
            "reason": outcome.reason,
        },
    )
    return outcome.status == DeliveryOutcome.PROCESSED
