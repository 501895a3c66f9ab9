"""Act on a flag through Voucherify's API: compensate, retry, settle -- never twice.

A failed rollback leaves a flag that a person ends; these actions end it through the API
instead of Voucherify's dashboard: ``compensate`` puts back on each card the debit our
ledger holds without its restore (never an amount typed), ``retry`` rolls the redemption
back again (settled instead when Voucherify did already), ``settle`` writes nothing and
resolves the flag when Voucherify and our books, healed as verify heals, agree. An action
and its calls are recorded (``flag_actions``, migration 0016) before the first call, one
open action per flag, under a transaction's advisory lock (which holds behind PgBouncer in
transaction mode too); one left open is looked up at Voucherify before anything is sent
again. What an answer reports goes into the books through ``workers.processing`` as an
event of its own, keyed like Voucherify's later webhook. The calls, the refusals
(``ActionRefused``) and the budget: docs/operations.md, "Acting on a flag".
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from config.logs import masked_code
from schemas.vocabulary import (
    ActionKind,
    ActionState,
    DeliveryOutcome,
    FlagCategory,
    FlagStatus,
    RedemptionStatus,
)
from workers import processing
from workers.jobs import drift_heal
from workers.jobs.verify import compare
from workers.jobs.verify.job import heal_from, reconcile
from workers.jobs.voucherify_api import (
    BudgetExhausted,
    OutcomeUnknown,
    VoucherifyApi,
    VoucherifyApiError,
)

log = logging.getLogger(__name__)
audit = logging.getLogger("audit.flag_actions")
"""One JSON line per action asked, done or refused: who, what, which flag, the outcome."""

SOURCE_PREFIX = "vfy-pipeline-action-"
"""``source_id`` of a compensation's balance transaction: ``<prefix><action id>-<card n>``."""
LOCK_SPACE = 0x76667961  # "vfya": the advisory-lock namespace of the flags' actions
ACTION_MAX_WAIT = 5.0
"""Seconds an action's call may wait for its slot of the shared budget: the next slot or
two, never a queue behind the jobs (``voucherify_api.Budget``); else the 503."""
LOOKUP_PAGES = 3
"""Pages (100 transactions, newest first) searched for an action's own transaction."""


class ActionRefused(Exception):
    """The action cannot be done now: the HTTP status and error code to answer with."""

    def __init__(self, status: int, code: str, detail: str, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.retry_after = retry_after


FLAG = """
SELECT id, category, status, redemption_id, rollback_id, failure_code, event_id
FROM flags WHERE id = %(id)s
"""
TRY_LOCK = "SELECT pg_try_advisory_xact_lock(%(space)s, %(key)s)"
OPEN_ACTION = """
SELECT id, kind, state, request, result FROM flag_actions
WHERE flag_id = %(flag_id)s AND state IN ('pending', 'unknown')
"""
RECORD = """
INSERT INTO flag_actions (flag_id, kind, requested_by, redemption_id, request)
VALUES (%(flag_id)s, %(kind)s, %(requested_by)s, %(redemption_id)s, %(request)s)
RETURNING id
"""
PROGRESS = "UPDATE flag_actions SET state = %(state)s, result = %(result)s WHERE id = %(id)s"
FINISH = """
UPDATE flag_actions SET state = %(state)s, result = %(result)s, error = %(error)s,
                        finished_at = now()
WHERE id = %(id)s
"""
FORGET = "DELETE FROM flag_actions WHERE id = %(id)s AND state = 'pending'"
# What a compensation puts back: the debits of the redemption (of a stack's parent: of its
# children) that our ledger holds without their restore, card by card.
CARDS_TO_RESTORE = """
SELECT d.voucher_id, d.voucher_code, d.kind, -d.amount AS amount, d.redemption_id
FROM ledger_entries d
WHERE d.effect = 'debit'
  AND d.redemption_id IN (SELECT %(id)s::text UNION ALL
                          SELECT redemption_id FROM redemptions
                          WHERE parent_redemption_id = %(id)s)
  AND NOT EXISTS (SELECT 1 FROM ledger_entries r
                  WHERE r.redemption_id = d.redemption_id AND r.effect = 'restore')
ORDER BY d.redemption_id
"""
IS_PARENT = "SELECT EXISTS (SELECT 1 FROM redemptions WHERE parent_redemption_id = %(id)s)"
# The failed attempt's own reason, from its webhook (gone once retention pruned the body).
ATTEMPT_REASON = """
SELECT COALESCE(payload, raw_body::jsonb) -> 'data' -> 'redemption_rollback' ->> 'reason'
FROM events WHERE event_id = %(event_id)s
"""
# Also a flag the action's own effect resolved meanwhile (a rollback ends the review flags
# of its redemption, migrations/0009): the note says which action, who asked, the result.
RESOLVE = """
UPDATE flags SET status = %(resolved)s, resolved_at = now(), note = %(note)s
WHERE id = %(id)s
  AND (status = %(open)s
       OR resolved_at >= (SELECT created_at FROM flag_actions WHERE id = %(action_id)s))
"""
ANNOTATE = "UPDATE flags SET note = %(note)s WHERE id = %(id)s AND status = %(open)s"


@dataclass(frozen=True, slots=True)
class Flag:
    id: int
    category: str
    status: str
    redemption_id: str | None
    rollback_id: str | None
    failure_code: str | None
    event_id: str | None


@dataclass(slots=True)
class Plan:
    """What an action will do: its calls (each with the key it is looked up by), and what a
    preview shows besides (the cards with Voucherify's balance now, the redemption)."""

    kind: ActionKind
    redemption_id: str
    calls: list[dict[str, Any]]
    shows: dict[str, Any] = field(default_factory=dict)
    theirs: dict[str, Any] | None = None
    """The redemption as Voucherify answered the plan's GET (retry, settle)."""

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "redemption_id": self.redemption_id, "calls": self.calls}


# --- what a person asks -----------------------------------------------------------------


def preview(
    pool: ConnectionPool, api: VoucherifyApi, flag_id: int, kind: str, deadline: float
) -> dict[str, Any]:
    """What ``act`` would do, with what Voucherify reports now; changes nothing here (its
    GETs count against the budget)."""
    flag = _actionable(pool, flag_id)
    with _budget_answers():
        plan = _plan(pool, api, flag, _kind(kind), deadline, preview=True)
    audit.info(
        "flag_action.previewed", extra={"flag_id": flag_id, "kind": plan.kind, "audit": True}
    )
    return {"flag_id": flag_id, "confirm": False, **plan.as_dict(), **plan.shows}


def act(
    pool: ConnectionPool,
    api: VoucherifyApi,
    flag_id: int,
    kind: str,
    requested_by: str,
    deadline: float,
) -> dict[str, Any]:
    """Do the action (after finishing an earlier one whose outcome is open); the action's
    record as it ends. ``ActionRefused`` when it cannot be done now."""
    action_kind = _kind(kind)
    with pool.connection() as lock, lock.transaction():
        key = {"space": LOCK_SPACE, "key": flag_id % 2**31}
        row = lock.execute(TRY_LOCK, key).fetchone()
        if not (row and row[0]):
            _refused(flag_id, action_kind, requested_by, "action_in_progress")
            raise ActionRefused(
                409, "action_in_progress", "another action on this flag is being done now"
            )
        with _budget_answers():
            earlier = _open_action(pool, flag_id)
            if earlier is not None:
                done = _finish_earlier(pool, api, _flag(pool, flag_id), earlier, deadline)
                if done is not None:
                    return done
            flag = _actionable(pool, flag_id)
            plan = _plan(pool, api, flag, action_kind, deadline, preview=False)
            action_id = _record(pool, flag, plan, requested_by)
            return _run(pool, api, flag, action_id, plan, requested_by, deadline, fresh=True)


# --- planning ---------------------------------------------------------------------------


def _kind(kind: str) -> ActionKind:
    try:
        return ActionKind(kind)
    except ValueError:
        choices = ", ".join(k.value for k in ActionKind)
        raise ActionRefused(400, "invalid_parameter", f"kind: one of {choices}") from None


def _flag(pool: ConnectionPool, flag_id: int) -> Flag:
    with pool.connection() as conn:
        row = conn.execute(FLAG, {"id": flag_id}).fetchone() if flag_id < 2**63 else None
    if row is None:
        raise ActionRefused(404, "not_found", f"no flag {flag_id}")
    return Flag(*row)


def _actionable(pool: ConnectionPool, flag_id: int) -> Flag:
    flag = _flag(pool, flag_id)
    if flag.status != FlagStatus.OPEN:
        raise ActionRefused(409, "flag_resolved", "the flag is resolved already")
    if flag.redemption_id is None or flag.category == FlagCategory.DRIFT:
        raise ActionRefused(
            409,
            "not_actionable",
            "only a flag of a redemption can be acted on (a drift flag has no redemption)",
        )
    return flag


def _plan(
    pool: ConnectionPool,
    api: VoucherifyApi,
    flag: Flag,
    kind: ActionKind,
    deadline: float,
    preview: bool,
) -> Plan:
    redemption_id = str(flag.redemption_id)
    if kind == ActionKind.COMPENSATE:
        return _plan_compensation(pool, api, redemption_id, deadline, preview)
    if kind == ActionKind.SETTLE and not preview:
        return Plan(kind, redemption_id, [])  # settling asks Voucherify itself (_settle)
    theirs = api.get_redemption(redemption_id, deadline)
    if theirs is None:
        raise ActionRefused(
            409, "unknown_at_voucherify", "Voucherify does not know this redemption (404)"
        )
    status = compare.status_from(theirs)
    rolled_back = _rolled_back(theirs)
    shows = {"voucherify": {"status": status, "rolled_back": rolled_back}}
    if kind == ActionKind.SETTLE or rolled_back:
        # Nothing to send: settled from Voucherify's answer (retry: "already rolled back").
        return Plan(kind, redemption_id, [], shows, theirs)
    with pool.connection() as conn:
        parent = bool((conn.execute(IS_PARENT, {"id": redemption_id}).fetchone() or [False])[0])
        reason_row = (
            conn.execute(ATTEMPT_REASON, {"event_id": flag.event_id}).fetchone()
            if flag.event_id
            else None
        )
    reason = (reason_row[0] if reason_row else None) or f"retry of flag {flag.id}"
    path = "rollbacks" if parent else "rollback"
    call = {
        "method": "POST",
        "path": f"/v1/redemptions/{redemption_id}/{path}",
        "stack": parent,
        "reason": reason,
        "tracking_id": theirs.get("tracking_id"),
        "key": redemption_id,
    }
    return Plan(kind, redemption_id, [call], shows, theirs)


def _plan_compensation(
    pool: ConnectionPool, api: VoucherifyApi, redemption_id: str, deadline: float, preview: bool
) -> Plan:
    with pool.connection() as conn:
        cursor = conn.cursor(row_factory=dict_row)
        cards = cursor.execute(CARDS_TO_RESTORE, {"id": redemption_id}).fetchall()
    if not cards:
        raise ActionRefused(
            409,
            "nothing_to_compensate",
            "our ledger holds no debit of this redemption without its restore",
        )
    calls = []
    shown = []
    for card in cards:
        call = {
            "method": "POST",
            "path": f"/v1/vouchers/{card['voucher_id']}/balance",
            "voucher_id": card["voucher_id"],
            "kind": card["kind"],
            "amount": int(card["amount"]),
            "reason": f"compensation of redemption {redemption_id}",
            "redemption_id": card["redemption_id"],
        }
        calls.append(call)
        seen = {**call, "voucher_code": masked_code(card["voucher_code"])}
        if preview:
            voucher = api.get_voucher(str(card["voucher_id"]), deadline) or {}
            held = voucher.get("gift") or voucher.get("loyalty_card") or {}
            seen["balance_now"] = held.get("balance")
        shown.append(seen)
    return Plan(ActionKind.COMPENSATE, redemption_id, calls, {"cards": shown})


def _rolled_back(theirs: dict[str, Any]) -> bool:
    return compare.status_from(theirs) == RedemptionStatus.ROLLED_BACK


# --- recording --------------------------------------------------------------------------


def _open_action(pool: ConnectionPool, flag_id: int) -> dict[str, Any] | None:
    with pool.connection() as conn:
        cursor = conn.cursor(row_factory=dict_row)
        return cursor.execute(OPEN_ACTION, {"flag_id": flag_id}).fetchone()


def _record(pool: ConnectionPool, flag: Flag, plan: Plan, requested_by: str) -> int:
    params = {
        "flag_id": flag.id,
        "kind": plan.kind,
        "requested_by": requested_by,
        "redemption_id": plan.redemption_id,
        "request": Jsonb(plan.as_dict()),
    }
    try:
        with pool.connection() as conn:
            row = conn.execute(RECORD, params).fetchone()
    except psycopg.errors.UniqueViolation:  # pragma: no cover - the advisory lock is first
        raise ActionRefused(409, "action_in_progress", "an action on this flag is open") from None
    assert row is not None
    action_id = int(row[0])
    audit.warning(
        "flag_action.started",
        extra={
            "audit": True,
            "action_id": action_id,
            "flag_id": flag.id,
            "kind": plan.kind,
            "requested_by": requested_by,
            "redemption_id": plan.redemption_id,
            "calls": len(plan.calls),
        },
    )
    return action_id


def _save(pool: ConnectionPool, action_id: int, state: ActionState, result: dict[str, Any]) -> None:
    with pool.connection() as conn:
        conn.execute(PROGRESS, {"id": action_id, "state": state, "result": Jsonb(result)})


def _end(
    pool: ConnectionPool,
    action_id: int,
    flag_id: int,
    state: ActionState,
    result: dict[str, Any],
    note: str,
    error: str | None = None,
) -> dict[str, Any]:
    """The action finished (succeeded: the flag resolved with its note; failed: noted)."""
    words = {"open": FlagStatus.OPEN, "resolved": FlagStatus.RESOLVED, "id": flag_id}
    with pool.connection() as conn, conn.transaction():
        conn.execute(
            FINISH, {"id": action_id, "state": state, "result": Jsonb(result), "error": error}
        )
        query = RESOLVE if state == ActionState.SUCCEEDED else ANNOTATE
        conn.execute(query, {**words, "note": note, "action_id": action_id})
        cursor = conn.cursor(row_factory=dict_row)
        row = cursor.execute(
            "SELECT id, flag_id, kind, state, requested_by, request, result, error,"
            " created_at, finished_at FROM flag_actions WHERE id = %(id)s",
            {"id": action_id},
        ).fetchone()
    audit.warning(
        f"flag_action.{state}",
        extra={"audit": True, "action_id": action_id, "flag_id": flag_id, "note": note},
    )
    return dict(row or {})


def _refused(flag_id: int, kind: str, requested_by: str, code: str) -> None:
    audit.warning(
        "flag_action.refused",
        extra={
            "audit": True,
            "flag_id": flag_id,
            "kind": kind,
            "requested_by": requested_by,
            "error": code,
        },
    )


@contextmanager
def _budget_answers() -> Iterator[None]:
    """The budget's refusal as the 503 a person sees, with how long to wait."""
    try:
        yield
    except BudgetExhausted as exc:
        raise ActionRefused(
            503,
            "budget_exhausted",
            f"the Voucherify API budget cannot take this call now ({exc.reason})",
            retry_after=_retry_after(exc.reason),
        ) from exc


def _retry_after(reason: str) -> int:
    if reason == "day":
        now = datetime.now(UTC)
        midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        return max(1, math.ceil((midnight - now).total_seconds()))
    return 60 if reason == "rate_limit_headers" else 2


# --- doing ------------------------------------------------------------------------------


def _run(
    pool: ConnectionPool,
    api: VoucherifyApi,
    flag: Flag,
    action_id: int,
    plan: Plan,
    requested_by: str,
    deadline: float,
    fresh: bool,
    done: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Make the plan's calls not yet done (a resumed action looks each one up first)."""
    result: dict[str, Any] = done or {"done": {}}
    by = f"{plan.kind} asked by {requested_by} (action {action_id})"
    if plan.kind == ActionKind.SETTLE or not plan.calls:
        return _settle(pool, api, flag, action_id, plan, by, deadline, result)
    for index, call in enumerate(plan.calls):
        if str(index) in result["done"]:
            continue
        if not fresh:
            found = _look_up(api, action_id, index, call, deadline)
            if found is not None:
                result["done"][str(index)] = found
                _save(pool, action_id, ActionState.PENDING, result)
                continue
        try:
            answer = _send(api, action_id, index, call, deadline)
        except BudgetExhausted:
            if not result["done"]:
                with pool.connection() as conn:
                    conn.execute(FORGET, {"id": action_id})  # nothing was sent
            raise
        except OutcomeUnknown as exc:
            _save(pool, action_id, ActionState.UNKNOWN, {**result, "unknown": index})
            audit.warning(
                "flag_action.unknown",
                extra={"audit": True, "action_id": action_id, "flag_id": flag.id},
            )
            raise ActionRefused(
                504,
                "outcome_unknown",
                f"Voucherify's answer was lost ({exc}); ask again: the outcome is looked up "
                "before anything is sent again",
            ) from exc
        except VoucherifyApiError as exc:
            if exc.key == "already_rolled_back" and plan.kind == ActionKind.RETRY:
                return _settle(pool, api, flag, action_id, plan, by, deadline, result)
            note = f"{by}: Voucherify refused {call['path']}: {exc.key or exc.status}: {exc}"
            return _end(pool, action_id, flag.id, ActionState.FAILED, result, note, str(exc))
        result["done"][str(index)] = answer
        _save(pool, action_id, ActionState.PENDING, result)
    summary = _apply(pool, api, plan, result, deadline)
    return _end(pool, action_id, flag.id, ActionState.SUCCEEDED, result, f"{by}: {summary}")


def _send(
    api: VoucherifyApi, action_id: int, index: int, call: dict[str, Any], deadline: float
) -> dict[str, Any]:
    """One write; what is kept of its answer (the rollback, the balance)."""
    if "voucher_id" in call:
        answer = api.add_balance(
            call["voucher_id"],
            call["amount"],
            call["reason"],
            _source_id(action_id, index),
            deadline,
            max_wait=ACTION_MAX_WAIT,
        )
        return {"balance": answer, "source_id": _source_id(action_id, index)}
    write: Callable[..., dict[str, Any]] = (
        api.rollback_stack if call["stack"] else api.rollback_redemption
    )
    answer = write(
        call["key"], call["reason"], call["tracking_id"], deadline, max_wait=ACTION_MAX_WAIT
    )
    return {"rollback": answer}


def _look_up(
    api: VoucherifyApi, action_id: int, index: int, call: dict[str, Any], deadline: float
) -> dict[str, Any] | None:
    """Whether an earlier try of this call took effect at Voucherify (None: it did not)."""
    if "voucher_id" in call:
        found = _own_transaction(api, call["voucher_id"], _source_id(action_id, index), deadline)
        return {"transaction": found, "looked_up": True} if found else None
    theirs = api.get_redemption(call["key"], deadline)
    if theirs is not None and _rolled_back(theirs):
        return {"rolled_back": True, "looked_up": True}
    return None


def _own_transaction(
    api: VoucherifyApi, voucher_id: str, source_id: str, deadline: float
) -> dict[str, Any] | None:
    cursor: str | None = None
    for _ in range(LOOKUP_PAGES):
        page = api.list_voucher_transactions(voucher_id, deadline, cursor)
        for transaction in page.get("data") or []:
            if isinstance(transaction, dict) and transaction.get("source_id") == source_id:
                return transaction
        cursor = page.get("more_starting_after")
        if not page.get("has_more") or not cursor:
            return None
    return None


def _source_id(action_id: int, index: int) -> str:
    return f"{SOURCE_PREFIX}{action_id}-{index}"


def _apply(
    pool: ConnectionPool,
    api: VoucherifyApi,
    plan: Plan,
    result: dict[str, Any],
    deadline: float,
) -> str:
    """Put what the answers report in the books, as events of their own; a summary."""
    if plan.kind == ActionKind.COMPENSATE:
        said = []
        for index, call in enumerate(plan.calls):
            done = result["done"][str(index)]
            transaction = done.get("transaction")
            if transaction is None:  # the answer has no transaction id: look it up
                try:
                    transaction = _own_transaction(
                        api, call["voucher_id"], done["source_id"], deadline
                    )
                except VoucherifyApiError as exc:
                    log.warning("flag_action.lookup_failed", extra={"error": str(exc)})
                done["transaction"] = transaction
            if transaction is not None:
                _apply_transaction(pool, call, transaction)
            said.append(
                f"{call['amount']} {call['kind']} added to card {call['voucher_id']}"
                f" (transaction {transaction['id'] if transaction else 'not yet listed'})"
            )
        return "; ".join(said)
    done = result["done"]["0"]
    rollback = (done.get("rollback") or {}) if isinstance(done, dict) else {}
    if plan.calls and plan.calls[0]["stack"]:
        rollback = rollback.get("parent_rollback") or {}
    if rollback and plan.theirs is not None:
        theirs = {**plan.theirs, "status": RedemptionStatus.ROLLED_BACK}
        heal_from(pool, plan.redemption_id, theirs, RedemptionStatus.ROLLED_BACK, rollback)
    else:  # looked up: Voucherify shows it rolled back; heal as verify does
        reconcile(pool, api, plan.redemption_id, deadline)
    return f"rolled back at Voucherify (rollback {rollback.get('id') or 'looked up'})"


def _apply_transaction(
    pool: ConnectionPool, call: dict[str, Any], transaction: dict[str, Any]
) -> None:
    card = drift_heal.Card(call["voucher_id"], None, call["kind"], None, datetime.now(UTC))
    event_id, body = drift_heal.webhook_body(card, transaction, job="action")
    outcome = processing.process_delivery(
        pool, body, f"action-{uuid.uuid4()}", datetime.now(UTC).isoformat()
    )
    log.warning(
        "flag_action.applied",
        extra={"event_id": event_id, "outcome": outcome.status, "reason": outcome.reason},
    )
    if outcome.status != DeliveryOutcome.PROCESSED:
        log.error("flag_action.not_applied", extra={"event_id": event_id})


def _settle(
    pool: ConnectionPool,
    api: VoucherifyApi,
    flag: Flag,
    action_id: int,
    plan: Plan,
    by: str,
    deadline: float,
    result: dict[str, Any],
) -> dict[str, Any]:
    """Resolved from Voucherify's answer, when it shows the redemption rolled back and our
    books, healed as verify heals, agree; else failed, the flag left open."""
    check = reconcile(pool, api, plan.redemption_id, deadline)
    result = {
        **result,
        "voucherify": check.theirs,
        "ours": check.ours.status if check.ours else None,
    }
    if check.theirs == RedemptionStatus.ROLLED_BACK and check.agrees:
        note = (
            f"{by}: Voucherify reports the redemption ROLLED_BACK (rollback "
            f"{check.rollback_id or 'unknown'}); our books agree"
        )
        return _end(pool, action_id, flag.id, ActionState.SUCCEEDED, result, note)
    note = (
        f"{by}: nothing settled: Voucherify reports {check.theirs or 'nothing (404)'}"
        f"{'; ' + check.problem if check.problem else ''}"
    )
    return _end(pool, action_id, flag.id, ActionState.FAILED, result, note, check.problem)


def _finish_earlier(
    pool: ConnectionPool,
    api: VoucherifyApi,
    flag: Flag,
    earlier: dict[str, Any],
    deadline: float,
) -> dict[str, Any] | None:
    """An action left open (its answer lost, its process gone): its calls are looked up and
    the ones that did not take effect are sent now -- when a person asks the same kind
    again. Asked another kind, an earlier action none of whose calls took effect ends
    failed and the new one goes on (None); one with effects is finished first."""
    request = earlier["request"]
    plan = Plan(ActionKind(request["kind"]), request["redemption_id"], request["calls"])
    if plan.kind == ActionKind.RETRY and plan.calls:
        plan.theirs = api.get_redemption(plan.redemption_id, deadline)
    result = earlier["result"] or {"done": {}}
    result.setdefault("done", {})
    by = f"{plan.kind} (action {earlier['id']}, its outcome looked up)"
    for index, call in enumerate(plan.calls):
        if str(index) not in result["done"]:
            found = _look_up(api, earlier["id"], index, call, deadline)
            if found is not None:
                result["done"][str(index)] = found
    if len(result["done"]) == len(plan.calls) and plan.calls:
        summary = _apply(pool, api, plan, result, deadline)
        return _end(pool, earlier["id"], flag.id, ActionState.SUCCEEDED, result, f"{by}: {summary}")
    if result["done"]:
        return _run(pool, api, flag, earlier["id"], plan, "a later ask", deadline, True, result)
    note = f"{by}: it did not take effect at Voucherify; nothing was applied"
    _end(pool, earlier["id"], flag.id, ActionState.FAILED, result, note, "not taken effect")
    return None
