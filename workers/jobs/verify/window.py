"""List what Voucherify created in a time window and compare it with our rows, page by page.

Calls grow with redemptions / 100, not with redemptions x checks: one
``GET /v1/redemptions`` page holds 100 redemptions *and* rollbacks (a rollback is an item
of its own, at its own date), so a lost rollback is seen when its date is listed, without
polling every redemption of the last 3 months.

The window of a run: from the watermark (``verify_watermarks``: everything created before
it was listed once) minus ``overlap`` (Voucherify's listing may show an item late) to
``now - settle`` (the webhooks get that long to arrive first; healing earlier would be
harmless, only wasted). The first run starts ``FIRST_LOOKBACK`` before its end. Pages are
asked oldest first (``order=created_at``); after each page the watermark moves to its last
item's date, so a run cut short by its deadline or the budget goes on from there next time.

Voucherify answers pages 1 to 99 only: when the 99th page is full, the rest of the window
is listed again from the last date seen (1 ms before it, so items sharing that instant are
not lost; items seen twice are compared once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from schemas.vocabulary import LedgerEffect, RedemptionStatus
from workers.jobs.verify import compare, translate
from workers.jobs.verify.compare import Ours
from workers.jobs.voucherify_api import MAX_PAGE, PAGE_LIMIT, VoucherifyApi, VoucherifyApiError

log = logging.getLogger(__name__)

WATERMARK = "redemptions"
FIRST_LOOKBACK = timedelta(days=1)
ONE_MS = timedelta(milliseconds=1)

READ_WINDOW = """
SELECT (SELECT swept_to FROM verify_watermarks WHERE name = %(name)s) AS swept_to,
       COALESCE(%(now)s::timestamptz, now()) - make_interval(secs => %(settle)s) AS end_at
"""
ADVANCE = """
INSERT INTO verify_watermarks (name, swept_to) VALUES (%(name)s, %(to)s)
ON CONFLICT (name) DO UPDATE
SET swept_to = GREATEST(verify_watermarks.swept_to, EXCLUDED.swept_to), updated_at = now()
"""
OUR_RECORDS = """
SELECT r.redemption_id, r.status, r.voucher_id,
       EXISTS (SELECT 1 FROM ledger_entries l
               WHERE l.redemption_id = r.redemption_id AND l.effect = %(debit)s) AS has_debit,
       EXISTS (SELECT 1 FROM ledger_entries l
               WHERE l.redemption_id = r.redemption_id AND l.effect = %(restore)s) AS has_restore
FROM redemptions r WHERE r.redemption_id = ANY(%(ids)s)
"""
FLAGGED_ROLLBACKS = "SELECT rollback_id FROM flags WHERE rollback_id = ANY(%(ids)s)"
# The listed orders whose status differs from ours and whose change is newer than our
# row's, by the handlers' own rule (order_change_wins, migrations/0008_order_changes.sql).
ORDERS_BEHIND = """
SELECT l.order_id
FROM unnest(%(ids)s::text[], %(statuses)s::text[], %(ats)s::timestamptz[])
     AS l(order_id, status, at)
LEFT JOIN orders o ON o.order_id = l.order_id
WHERE o.status IS DISTINCT FROM l.status
  AND order_change_wins(l.status, l.at, o.status, o.status_at)
"""


@dataclass(frozen=True, slots=True)
class Heal:
    """What to apply for one redemption: Voucherify's answer, status, rollback, events."""

    redemption_id: str
    theirs: dict[str, Any]
    status: str | None
    rollback: dict[str, Any] | None
    events: list[str]
    problem: Callable[[Ours | None], str | None]
    """Given our record after healing: what still disagrees (None: nothing)."""


@dataclass(frozen=True, slots=True)
class Synthetic:
    """One event our records miss that is not a redemption's status: a failed rollback's
    flag, an order's change. Applied through the inbox like a delivery."""

    event_id: str
    type: str
    data: dict[str, Any]
    at: str | None
    subject: str
    """The redemption or order it is about (for the log)."""


def read_window(
    pool: ConnectionPool, settle_seconds: int, overlap_seconds: int, now: datetime | None = None
) -> tuple[datetime, datetime]:
    """The run's window; ``now`` is the database's clock unless given (the benchmark's day)."""
    params = {"name": WATERMARK, "settle": settle_seconds, "now": now}
    with pool.connection() as conn:
        row = conn.cursor(row_factory=dict_row).execute(READ_WINDOW, params).fetchone()
    assert row is not None
    end: datetime = row["end_at"]
    swept_to: datetime | None = row["swept_to"]
    start = swept_to - timedelta(seconds=overlap_seconds) if swept_to else end - FIRST_LOOKBACK
    return start, end


def advance(pool: ConnectionPool, to: datetime) -> None:
    with pool.connection() as conn:
        conn.execute(ADVANCE, {"name": WATERMARK, "to": to})


def our_records(pool: ConnectionPool, ids: Iterable[str]) -> dict[str, Ours]:
    params = {"ids": sorted(set(ids)), "debit": LedgerEffect.DEBIT, "restore": LedgerEffect.RESTORE}
    with pool.connection() as conn:
        rows = conn.cursor(row_factory=dict_row).execute(OUR_RECORDS, params).fetchall()
    return {
        row["redemption_id"]: Ours(
            row["status"], row["voucher_id"], row["has_debit"], row["has_restore"]
        )
        for row in rows
    }


def sweep(
    pool: ConnectionPool,
    api: VoucherifyApi,
    settle_seconds: int,
    overlap_seconds: int,
    deadline: float,
    heal: Callable[[Heal], None],
    tally: dict[str, int],
    apply: Callable[[Synthetic], bool],
    page_limit: int = PAGE_LIMIT,
    max_page: int = MAX_PAGE,
    now: datetime | None = None,
) -> bool:
    """List the run's window and ``heal`` what disagrees; False when cut short.

    ``BudgetExhausted`` and ``VoucherifyApiError`` go up to the job, the watermark left
    where the last complete page put it.
    """
    start, end = read_window(pool, settle_seconds, overlap_seconds, now)
    if start >= end:
        return True
    seen: set[str] = set()
    listed: dict[str, dict[str, Any]] = {}  # this run's redemptions: parents of rollbacks
    cursor = start
    while True:
        last: datetime | None = None
        for page in range(1, max_page + 1):
            if api.clock() >= deadline:
                return False
            items = api.list_redemptions(cursor, end, page, deadline, limit=page_limit)
            tally["pages"] += 1
            fresh = [i for i in items if isinstance(i.get("id"), str) and i["id"] not in seen]
            seen.update(i["id"] for i in fresh)
            compare_page(pool, api, fresh, listed, deadline, heal, tally, apply)
            if len(items) < page_limit:
                advance(pool, end)
                return True
            last = _date(items[-1]) or last
            if last is not None:
                advance(pool, min(last, end))
        # 99 full pages: list the rest of the window from the last instant seen.
        if last is None or last - ONE_MS <= cursor:
            raise VoucherifyApiError(
                f"GET /v1/redemptions: more than {max_page * page_limit} items at one instant "
                f"({cursor.isoformat()}), or items without dates: cannot page further"
            )
        cursor = last - ONE_MS
        tally["windows_split"] += 1


def compare_page(
    pool: ConnectionPool,
    api: VoucherifyApi,
    items: list[dict[str, Any]],
    listed: dict[str, dict[str, Any]],
    deadline: float,
    heal: Callable[[Heal], None],
    tally: dict[str, int],
    apply: Callable[[Synthetic], bool],
) -> None:
    """Compare one page with our rows (one query, two more when the page has failed
    rollbacks or orders) and heal each item that disagrees."""
    ids = [
        str(item.get("redemption")) if compare.is_rollback(item) else str(item["id"])
        for item in items
    ]
    ours = our_records(pool, ids)
    failed = {
        str(item["id"])
        for item in items
        if compare.is_rollback(item) and compare.failed_rollback(item) and item.get("redemption")
    }
    unflagged = failed - _flagged(pool, sorted(failed))
    for item, redemption_id in zip(items, ids, strict=True):
        tally["listed"] += 1
        if compare.is_rollback(item):
            if str(item["id"]) in unflagged:
                _flag_failed_rollback(item, redemption_id, listed, apply, tally)
                continue
            _compare_rollback(
                api, item, redemption_id, ours.get(redemption_id), listed, deadline, heal
            )
        else:
            listed[redemption_id] = item
            _compare_redemption(item, redemption_id, ours.get(redemption_id), heal)
    _compare_orders(pool, items, apply, tally)


def _flagged(pool: ConnectionPool, rollback_ids: list[str]) -> set[str]:
    if not rollback_ids:
        return set()
    with pool.connection() as conn:
        rows = conn.execute(FLAGGED_ROLLBACKS, {"ids": rollback_ids}).fetchall()
    return {row[0] for row in rows}


def _flag_failed_rollback(
    rollback: dict[str, Any],
    redemption_id: str,
    listed: dict[str, dict[str, Any]],
    apply: Callable[[Synthetic], bool],
    tally: dict[str, int],
) -> None:
    """A failed rollback our records have no flag of (its webhook was lost): the webhook's
    effect, the flag, from the listing alone."""
    data = translate.rollback_failed_data(listed.get(redemption_id), redemption_id, rollback)
    event_id = translate.rollback_failed_event_id(str(rollback["id"]))
    if apply(Synthetic(event_id, compare.ROLLBACK_FAILED, data, _text(rollback), redemption_id)):
        tally["applied"] += 1
        tally["failed_rollbacks_flagged"] += 1


def _compare_orders(
    pool: ConnectionPool,
    items: list[dict[str, Any]],
    apply: Callable[[Synthetic], bool],
    tally: dict[str, int],
) -> None:
    """The orders the page shows, against our rows: a change ours lacks (a lost order
    event) is applied as the order event it would have been. No call of its own."""
    orders: dict[str, dict[str, Any]] = {}
    for item in items:
        order = item.get("order")
        if isinstance(order, dict) and isinstance(order.get("id"), str) and order.get("status"):
            orders[order["id"]] = order
    if not orders:
        return
    dated = {oid: _text(o, "updated_at", "created_at") for oid, o in orders.items()}
    params = {
        "ids": list(orders),
        "statuses": [str(o["status"]) for o in orders.values()],
        "ats": [_parsed(dated[oid]) for oid in orders],
    }
    with pool.connection() as conn:
        behind = [row[0] for row in conn.execute(ORDERS_BEHIND, params).fetchall()]
    for order_id in behind:
        order, at = orders[order_id], dated[order_id]
        event_id = translate.order_event_id(order_id, str(order["status"]), at)
        data = translate.order_data(order)
        if apply(Synthetic(event_id, compare.ORDER_UPDATED, data, at, order_id)):
            tally["applied"] += 1
            tally["orders_healed"] += 1


def _compare_redemption(
    item: dict[str, Any], redemption_id: str, ours: Ours | None, heal: Callable[[Heal], None]
) -> None:
    status = compare.status_from(item)
    if compare.listed_disagreement(item, status, ours) is None:
        return
    events = compare.listed_events(item, status, ours)
    heal(
        Heal(
            redemption_id,
            item,
            status,
            None,
            events,
            lambda after: compare.listed_disagreement(item, status, after),
        )
    )


def _compare_rollback(
    api: VoucherifyApi,
    rollback: dict[str, Any],
    redemption_id: str,
    ours: Ours | None,
    listed: dict[str, dict[str, Any]],
    deadline: float,
    heal: Callable[[Heal], None],
) -> None:
    """A successful rollback: our record must be ROLLED_BACK, with the restore for a card."""
    if not compare.succeeded(rollback) or not rollback.get("redemption"):
        return  # a failed rollback moved nothing (its flag is _flag_failed_rollback's)
    rolled_back = RedemptionStatus.ROLLED_BACK
    card = compare.is_card(rollback)
    if ours is not None and ours.status == rolled_back and (ours.has_restore or not card):
        return
    # Our record misses the rollback: the redemption itself, as Voucherify has it now.
    theirs = listed.get(redemption_id) or api.get_redemption(redemption_id, deadline)
    if theirs is None:
        unknown = f"Voucherify lists rollback {rollback.get('id')} of a redemption it does not know"
        heal(Heal(redemption_id, {"id": redemption_id}, None, rollback, [], lambda _: unknown))
        return
    events = compare.missing_events(theirs, rolled_back, rollback, ours)
    heal(
        Heal(
            redemption_id,
            theirs,
            rolled_back,
            rollback,
            events,
            lambda after: compare.disagreement(theirs, rolled_back, rollback, after),
        )
    )


def _text(item: dict[str, Any], *keys: str) -> str | None:
    """The first of ``keys`` (default: ``date``, ``created_at``) that holds a string."""
    for key in keys or ("date", "created_at"):
        value = item.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _date(item: dict[str, Any]) -> datetime | None:
    return _parsed(_text(item))


def _parsed(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
