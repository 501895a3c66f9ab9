"""Verify against Voucherify: ask the API what happened, apply it through the same handlers.

What is checked, each run, at most ``VERIFY_BATCH_SIZE`` of each, oldest check first:

- open flags of a failed rollback (``already_rolled_back``, ``review``) and the flags this
  job raised itself (``verify_mismatch``);
- redemptions without a final state whose last event is older than
  ``VERIFY_AFTER_SECONDS``: ``SUCCEEDED`` ones within Voucherify's rollback window (a
  rollback can come up to 3 months later, and its webhook may be lost), and card
  redemptions ``ROLLED_BACK`` whose debit or restore is missing from the ledger. Each is
  checked again ``VERIFY_AFTER_SECONDS`` after its last check, round-robin.

Healing: Voucherify's answer becomes the webhook ``data`` it would have sent
(``redemption.succeeded``, ``redemption.rollback.succeeded``, ``redemption.failed``) and
goes through ``workers.processing`` as an event of its own, ``verify:<redemption id>:<
status>``: the inbox records it once, the handlers apply it in one transaction, and the
ledger's UNIQUE (redemption_id, effect) key makes a restore or a debit impossible to
apply twice, whether the webhook or the job gets there first. Only what is missing is
applied; a redemption that already agrees with Voucherify is just marked checked. The
card balance is not taken from the API (its voucher is a snapshot whose time is unknown):
the drift job works from webhook reports only.

Flags: a failed-rollback flag whose redemption Voucherify reports ``ROLLED_BACK``, with our
record ``ROLLED_BACK`` and the restore in the ledger, is resolved with a note saying so
(the rollback happened and our books show it: nothing is left for a person). Any other
answer is written on the flag as a note and the flag stays open. What the job cannot make
agree (Voucherify says ``SUCCEEDED`` where we recorded a rollback, or does not know the
redemption) raises one open ``review`` flag ``verify_mismatch`` per redemption, resolved
by the job itself once the two agree.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from psycopg_pool import ConnectionPool

from workers import processing
from workers.jobs.voucherify_api import VoucherifyApi, VoucherifyApiError

log = logging.getLogger(__name__)

ROLLBACK_WINDOW_DAYS = 92
"""Voucherify rolls back redemptions up to 3 months old: past that, SUCCEEDED is final."""
CARD_TYPES = ("GIFT_VOUCHER", "LOYALTY_CARD")
MISMATCH = "verify_mismatch"
EVENT_STATUS = {
    "redemption.succeeded": "SUCCEEDED",
    "redemption.rollback.succeeded": "ROLLED_BACK",
    "redemption.failed": "FAILED",
}

CLAIM_FLAGS = """
WITH due AS (
    SELECT id, verified_at FROM flags
    WHERE status = 'open' AND category IN ('already_rolled_back', 'review')
      AND redemption_id IS NOT NULL
      AND (verified_at IS NULL OR verified_at < now() - make_interval(secs => %(after)s))
    ORDER BY verified_at NULLS FIRST, id
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
UPDATE flags f SET verified_at = now() FROM due WHERE f.id = due.id
RETURNING f.id, f.category, f.redemption_id, f.failure_code, due.verified_at
"""

CLAIM_REDEMPTIONS = f"""
WITH due AS (
    SELECT r.redemption_id, r.verified_at FROM redemptions r
    WHERE COALESCE(r.last_event_at, r.updated_at) < now() - make_interval(secs => %(after)s)
      AND (r.verified_at IS NULL OR r.verified_at < now() - make_interval(secs => %(after)s))
      AND (
        (r.status = 'SUCCEEDED'
         AND COALESCE(r.redeemed_at, r.last_event_at, r.created_at)
             > now() - interval '{ROLLBACK_WINDOW_DAYS} days')
        OR (r.status = 'ROLLED_BACK' AND r.voucher_type IN ('GIFT_VOUCHER', 'LOYALTY_CARD')
            AND COALESCE(r.amount, 0) <> 0
            AND (NOT EXISTS (SELECT 1 FROM ledger_entries l
                             WHERE l.redemption_id = r.redemption_id AND l.effect = 'debit')
                 OR NOT EXISTS (SELECT 1 FROM ledger_entries l
                                WHERE l.redemption_id = r.redemption_id
                                  AND l.effect = 'restore')))
      )
    ORDER BY r.verified_at NULLS FIRST, r.last_event_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
UPDATE redemptions r SET verified_at = now() FROM due
WHERE r.redemption_id = due.redemption_id
RETURNING r.redemption_id, due.verified_at
"""  # noqa: S608 - the only formatted value is a constant of this module

UNCLAIM_FLAG = "UPDATE flags SET verified_at = %(verified_at)s WHERE id = %(id)s"
UNCLAIM_REDEMPTION = (
    "UPDATE redemptions SET verified_at = %(verified_at)s WHERE redemption_id = %(id)s"
)

OUR_RECORD = """
SELECT r.status, r.voucher_id,
       EXISTS (SELECT 1 FROM ledger_entries l
               WHERE l.redemption_id = r.redemption_id AND l.effect = 'debit'),
       EXISTS (SELECT 1 FROM ledger_entries l
               WHERE l.redemption_id = r.redemption_id AND l.effect = 'restore')
FROM redemptions r WHERE r.redemption_id = %(id)s
"""

MARK_VERIFIED = "UPDATE redemptions SET verified_at = now() WHERE redemption_id = %(id)s"

RAISE_MISMATCH = f"""
INSERT INTO flags (category, redemption_id, voucher_id, failure_code, failure_message,
                   verified_at)
VALUES ('review', %(id)s, %(voucher_id)s, '{MISMATCH}', %(message)s, now())
ON CONFLICT (redemption_id) WHERE failure_code = '{MISMATCH}' AND status = 'open'
DO UPDATE SET failure_message = EXCLUDED.failure_message, verified_at = now()
RETURNING (xmax = 0) AS raised
"""  # noqa: S608 - constants of this module only

RESOLVE_MISMATCH = f"""
UPDATE flags SET status = 'resolved', resolved_at = now(), note = %(note)s
WHERE redemption_id = %(id)s AND failure_code = '{MISMATCH}' AND status = 'open'
"""  # noqa: S608 - constants of this module only

RESOLVE_FLAG = """
UPDATE flags SET status = 'resolved', resolved_at = now(), note = %(note)s
WHERE id = %(id)s AND status = 'open'
"""

ANNOTATE_FLAG = "UPDATE flags SET note = %(note)s WHERE id = %(id)s AND status = 'open'"


@dataclass(frozen=True, slots=True)
class VerifyResult:
    checked: int = 0
    applied: int = 0
    flags_resolved: int = 0
    flags_annotated: int = 0
    mismatches: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Ours:
    status: str
    voucher_id: str | None
    has_debit: bool
    has_restore: bool


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


@dataclass
class _Tally:
    checked: int = 0
    applied: int = 0
    flags_resolved: int = 0
    flags_annotated: int = 0
    mismatches: int = 0
    errors: int = 0


def verify(
    pool: ConnectionPool,
    api: VoucherifyApi,
    after_seconds: int,
    batch_size: int,
    deadline: float,
) -> VerifyResult:
    tally = _Tally()
    with pool.connection() as conn, conn.transaction():
        flags = conn.execute(CLAIM_FLAGS, {"after": after_seconds, "batch": batch_size}).fetchall()
    for index, (flag_id, category, redemption_id, code, previous) in enumerate(flags):
        if time.monotonic() >= deadline:
            _unclaim(pool, UNCLAIM_FLAG, [(f[0], f[4]) for f in flags[index:]])
            return _result(tally)
        try:
            check = reconcile(pool, api, redemption_id, deadline, tally)
        except VoucherifyApiError as exc:
            _unclaim(pool, UNCLAIM_FLAG, [(flag_id, previous)])
            if exc.permanent:
                _unclaim(pool, UNCLAIM_FLAG, [(f[0], f[4]) for f in flags[index + 1 :]])
                raise
            _api_failed(redemption_id, exc, tally)
            continue
        _settle_flag(pool, flag_id, category, code, check, tally)

    with pool.connection() as conn, conn.transaction():
        due = conn.execute(
            CLAIM_REDEMPTIONS, {"after": after_seconds, "batch": batch_size}
        ).fetchall()
    for index, (redemption_id, previous) in enumerate(due):
        if time.monotonic() >= deadline:
            _unclaim(pool, UNCLAIM_REDEMPTION, due[index:])
            break
        try:
            reconcile(pool, api, redemption_id, deadline, tally)
        except VoucherifyApiError as exc:
            _unclaim(pool, UNCLAIM_REDEMPTION, [(redemption_id, previous)])
            if exc.permanent:
                _unclaim(pool, UNCLAIM_REDEMPTION, due[index + 1 :])
                raise
            _api_failed(redemption_id, exc, tally)
    return _result(tally)


def _result(tally: _Tally) -> VerifyResult:
    result = VerifyResult(**asdict(tally))
    if result.applied or result.mismatches or result.errors or result.flags_resolved:
        log.warning("verify.done", extra=result.as_dict())
    return result


def _api_failed(redemption_id: str, exc: VoucherifyApiError, tally: _Tally) -> None:
    tally.errors += 1
    log.error("verify.api_failed", extra={"redemption_id": redemption_id, "error": str(exc)})


def _unclaim(pool: ConnectionPool, query: str, items: Any) -> None:
    """Give back the check of items not checked after all, so they come first next run."""
    if not items:
        return
    with pool.connection() as conn, conn.transaction():
        for item_id, previous in items:
            conn.execute(query, {"id": item_id, "verified_at": previous})


def reconcile(
    pool: ConnectionPool,
    api: VoucherifyApi,
    redemption_id: str,
    deadline: float,
    tally: _Tally | None = None,
) -> Check:
    """Fetch one redemption, apply what our records miss, say whether they now agree."""
    tally = tally if tally is not None else _Tally()
    tally.checked += 1
    theirs = api.get_redemption(redemption_id, deadline)
    if theirs is None:
        ours = _ours(pool, redemption_id)
        unknown = "Voucherify does not know this redemption (404)"
        return _conclude(pool, Check(redemption_id, None, ours, 0, unknown), tally)

    status = _status(theirs.get("status"))
    rollback: dict[str, Any] | None = None
    if status == "ROLLED_BACK":
        rollback = _rollback_of(api, theirs, deadline)
    ours = _ours(pool, redemption_id)
    applied = 0
    for event_type, data, at in _missing_events(theirs, status, rollback, ours):
        if _apply(pool, redemption_id, event_type, data, at):
            applied += 1
    tally.applied += applied
    ours = _ours(pool, redemption_id)
    problem = _disagreement(theirs, status, rollback, ours)
    rollback_id = rollback.get("id") if rollback else None
    return _conclude(pool, Check(redemption_id, status, ours, applied, problem, rollback_id), tally)


def _conclude(pool: ConnectionPool, check: Check, tally: _Tally) -> Check:
    with pool.connection() as conn, conn.transaction():
        conn.execute(MARK_VERIFIED, {"id": check.redemption_id})
        if check.problem is None:
            conn.execute(
                RESOLVE_MISMATCH,
                {
                    "id": check.redemption_id,
                    "note": f"resolved by the verify job at {_now()}: our records now agree "
                    f"with Voucherify ({check.theirs})",
                },
            )
            return check
        message = (
            f"Voucherify reports {check.theirs or 'nothing (404)'}; our record: "
            f"{check.ours.status if check.ours else 'none'}: {check.problem}"
        )
        row = conn.execute(
            RAISE_MISMATCH,
            {
                "id": check.redemption_id,
                "voucher_id": check.ours.voucher_id if check.ours else None,
                "message": message,
            },
        ).fetchone()
    tally.mismatches += 1
    log.error(
        "verify.mismatch",
        extra={
            "redemption_id": check.redemption_id,
            "problem": check.problem,
            "new_flag": bool(row and row[0]),
        },
    )
    return check


def _settle_flag(
    pool: ConnectionPool,
    flag_id: int,
    category: str,
    code: str | None,
    check: Check,
    tally: _Tally,
) -> None:
    if code == MISMATCH:
        return  # _conclude resolved or refreshed it already
    ours = check.ours
    rolled_back = (
        check.agrees and check.theirs == "ROLLED_BACK" and ours and ours.status == "ROLLED_BACK"
    )
    with pool.connection() as conn, conn.transaction():
        if rolled_back:
            restore = "the restore is in the ledger" if ours and ours.has_restore else "no ledger"
            note = (
                f"resolved by the verify job at {_now()}: Voucherify reports the redemption "
                f"ROLLED_BACK (rollback {check.rollback_id or 'unknown'}); our record is "
                f"ROLLED_BACK and {restore}"
            )
            conn.execute(RESOLVE_FLAG, {"id": flag_id, "note": note})
            tally.flags_resolved += 1
            log.info("verify.flag_resolved", extra={"flag_id": flag_id, "category": category})
            return
        note = (
            f"checked by the verify job at {_now()}: Voucherify reports "
            f"{check.theirs or 'nothing (404)'}; our record: {ours.status if ours else 'none'}"
        )
        conn.execute(ANNOTATE_FLAG, {"id": flag_id, "note": note})
        tally.flags_annotated += 1


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _ours(pool: ConnectionPool, redemption_id: str) -> Ours | None:
    with pool.connection() as conn:
        row = conn.execute(OUR_RECORD, {"id": redemption_id}).fetchone()
    return Ours(*row) if row else None


# --- from Voucherify's answer to the events our records miss ----------------------------


def _status(value: Any) -> str | None:
    return str(value).strip().upper().replace(" ", "_") if value else None


def _amount(obj: dict[str, Any]) -> int | None:
    """Credits or points moved: ``amount``, else ``gift.amount`` / ``loyalty_card.points``."""
    for value in (
        obj.get("amount"),
        (obj.get("gift") or {}).get("amount"),
        (obj.get("loyalty_card") or {}).get("points"),
    ):
        if isinstance(value, int) and not isinstance(value, bool) and value:
            return value
    return None


def _is_card(theirs: dict[str, Any]) -> bool:
    voucher = theirs.get("voucher") or {}
    return str(voucher.get("type") or "").upper() in CARD_TYPES and bool(_amount(theirs))


def _rollback_of(
    api: VoucherifyApi, theirs: dict[str, Any], deadline: float
) -> dict[str, Any] | None:
    """The latest rollback of a rolled-back redemption, in full when Voucherify has it."""
    related = theirs.get("related_redemptions") or {}
    rollbacks = [r for r in related.get("rollbacks") or [] if isinstance(r, dict) and r.get("id")]
    if not rollbacks:
        return None
    latest = max(rollbacks, key=lambda r: str(r.get("date") or ""))
    full = api.get_redemption(str(latest["id"]), deadline)
    return full if full is not None else latest


def _missing_events(
    theirs: dict[str, Any],
    status: str | None,
    rollback: dict[str, Any] | None,
    ours: Ours | None,
) -> list[tuple[str, dict[str, Any], str | None]]:
    card = _is_card(theirs)
    events: list[tuple[str, dict[str, Any], str | None]] = []
    debit_missing = ours is None or (card and not ours.has_debit)
    if status in ("SUCCEEDED", "ROLLED_BACK") and debit_missing:
        events.append(("redemption.succeeded", _succeeded_data(theirs), theirs.get("date")))
    rollback_missing = (
        ours is None or ours.status != "ROLLED_BACK" or (card and not ours.has_restore)
    )
    if status == "ROLLED_BACK" and rollback is not None and rollback_missing:
        events.append(
            (
                "redemption.rollback.succeeded",
                _rollback_data(theirs, rollback),
                rollback.get("date") or theirs.get("date"),
            )
        )
    if status == "FAILED" and ours is None:
        events.append(("redemption.failed", _succeeded_data(theirs), theirs.get("date")))
    return events


def _disagreement(
    theirs: dict[str, Any],
    status: str | None,
    rollback: dict[str, Any] | None,
    ours: Ours | None,
) -> str | None:
    if status not in ("SUCCEEDED", "FAILED", "ROLLED_BACK"):
        return f"Voucherify reports an unknown status {theirs.get('status')!r}"
    if status == "ROLLED_BACK" and rollback is None:
        return "Voucherify reports ROLLED_BACK but names no rollback"
    if ours is None:
        return "our record could not be created from Voucherify's answer (see dead letters)"
    if ours.status != status:
        return f"our record is {ours.status}, Voucherify's is {status}"
    if _is_card(theirs):
        if status in ("SUCCEEDED", "ROLLED_BACK") and not ours.has_debit:
            return "the debit is missing from the ledger"
        if status == "ROLLED_BACK" and not ours.has_restore:
            return "the restore is missing from the ledger"
    return None


def _customer(theirs: dict[str, Any]) -> dict[str, Any] | None:
    customer = theirs.get("customer")
    customer_id = (customer or {}).get("id") if isinstance(customer, dict) else None
    customer_id = customer_id or theirs.get("customer_id")
    return {"id": customer_id} if customer_id else None


def _order(obj: dict[str, Any]) -> dict[str, Any] | None:
    order = obj.get("order")
    return order if isinstance(order, dict) and order.get("id") else None


def _snapshot(theirs: dict[str, Any]) -> dict[str, Any]:
    """The ``redemption`` object of a webhook, from the API's redemption."""
    order = _order(theirs)
    return {
        "id": theirs.get("id"),
        "object": "redemption",
        "status": theirs.get("status"),
        "date": theirs.get("date"),
        "amount": _amount(theirs),
        "redemption": theirs.get("redemption"),
        "customer_id": theirs.get("customer_id"),
        "failure_code": theirs.get("failure_code"),
        "failure_message": theirs.get("failure_message"),
        "reason": theirs.get("reason"),
        "order": {"id": order["id"]} if order else None,
        "voucher": theirs.get("voucher"),
    }


def _succeeded_data(theirs: dict[str, Any]) -> dict[str, Any]:
    # No top-level ``voucher``: its balance is a snapshot of unknown time, and the handlers
    # read the card from the redemption's own voucher.
    return {
        "redemption": _snapshot(theirs),
        "order": _order(theirs),
        "customer": _customer(theirs),
        "voucher": None,
    }


def _rollback_data(theirs: dict[str, Any], rollback: dict[str, Any]) -> dict[str, Any]:
    amount = _amount(rollback)
    return {
        "redemption": _snapshot(theirs),
        "redemption_rollback": {
            "id": rollback.get("id"),
            "object": "redemption_rollback",
            "status": "SUCCEEDED",
            "date": rollback.get("date"),
            "amount": -abs(amount) if amount else None,
            "redemption": theirs.get("id"),
            "customer_id": rollback.get("customer_id") or theirs.get("customer_id"),
            "reason": rollback.get("reason"),
            "order": {"id": o["id"]} if (o := _order(rollback) or _order(theirs)) else None,
        },
        "order": _order(rollback) or _order(theirs),
        "customer": _customer(theirs),
        "voucher": None,
    }


def _apply(
    pool: ConnectionPool,
    redemption_id: str,
    event_type: str,
    data: dict[str, Any],
    at: str | None,
) -> bool:
    """One synthetic event through the inbox and the handlers; True when it was applied."""
    event_id = f"verify:{redemption_id}:{EVENT_STATUS[event_type]}"
    created_at = at or _now()
    body = json.dumps(
        {
            "id": event_id,
            "created_at": created_at,
            "type": event_type,
            "data": data,
            "source": {"id": "verify", "object": "reconciliation"},
            "event": {"id": event_id, "type": event_type, "created_at": created_at},
        },
        separators=(",", ":"),
    )
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
    return outcome.status == "processed"
