"""The named queries of ``ops.queries`` run on the caller's connection.

One small function per question: it takes the connection of the caller's transaction
(``ops.service`` opens them), passes the values as parameters and returns plain dicts
(column name -> value, ``dict_row``). Lists fetch ``limit + 1`` rows and turn the extra
one into a ``Page``'s ``next_cursor``. An unknown id is ``None`` here; the service turns
it into ``NotFound``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

from ops import queries as q
from schemas.vocabulary import (
    UNFINISHED_STATUSES,
    EventStatus,
    FlagCategory,
    FlagStatus,
    LedgerKind,
    values,
)

Row = dict[str, Any]
Conn = psycopg.Connection[Any]
EventCursor = tuple[datetime, str]
"""The events list's keyset: (received_at, event_id) of the last row seen."""


def _one(conn: Conn, query: str, params: dict[str, Any] | None = None) -> Row | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params or {})
        return cur.fetchone()


def _all(conn: Conn, query: str, params: dict[str, Any] | None = None) -> list[Row]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params or {})
        return cur.fetchall()


def _bigint(value: int) -> bool:
    return 0 < value < 2**63


def _texts(statuses: Sequence[str] | None) -> list[str] | None:
    """A status filter as a ``text[]`` parameter (None: any)."""
    return [str(s) for s in statuses] if statuses else None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a list and the cursor of the next (None on the last page)."""

    items: list[Row]
    next_cursor: Any

    def as_dict(self) -> dict[str, Any]:
        return {"items": self.items, "next_cursor": self.next_cursor}


def page(rows: list[Row], limit: int, cursor_of: str) -> Page:
    """Rows fetched with ``LIMIT limit + 1``: the extra row means there is a next page."""
    if len(rows) > limit:
        rows = rows[:limit]
        return Page(rows, rows[-1][cursor_of])
    return Page(rows, None)


# --- events -----------------------------------------------------------------------------


def event(conn: Conn, event_id: str) -> Row | None:
    row = _one(conn, q.EVENT, {"event_id": event_id})
    if row is None:
        return None
    deliveries = _all(conn, q.EVENT_DELIVERIES, {"event_id": event_id})
    row["deliveries"] = deliveries
    row["delivery_ids"] = [d["delivery_id"] for d in deliveries]
    row["dead_letters"] = _all(conn, q.EVENT_DEAD_LETTERS, {"event_id": event_id})
    return row


def events(
    conn: Conn,
    *,
    statuses: Sequence[str] | None = None,
    event_type: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: EventCursor | None = None,
    limit: int = 50,
) -> Page:
    """Newest first; ``next_cursor`` is an ``EventCursor``."""
    rows = _all(
        conn,
        q.EVENTS,
        {
            "statuses": _texts(statuses),
            "type": event_type,
            "since": since,
            "until": until,
            "cursor_at": cursor[0] if cursor else None,
            "cursor_id": cursor[1] if cursor else None,
            "limit": limit + 1,
        },
    )
    if len(rows) > limit:
        rows = rows[:limit]
        return Page(rows, (rows[-1]["received_at"], rows[-1]["event_id"]))
    return Page(rows, None)


def events_to_replay(
    conn: Conn,
    *,
    since: datetime,
    until: datetime | None,
    statuses: Sequence[str] | None,
    after: EventCursor | None,
    limit: int,
) -> list[Row]:
    return _all(
        conn,
        q.EVENTS_TO_REPLAY,
        {
            "statuses": _texts(statuses),
            "since": since,
            "until": until,
            "cursor_at": after[0] if after else None,
            "cursor_id": after[1] if after else None,
            "limit": limit,
        },
    )


def requeue_event(conn: Conn, event_id: str) -> Row | None:
    """Set the event back to received (row locked until commit); None without a payload."""
    row = _one(conn, q.REQUEUE_EVENT, {"event_id": event_id, "received": EventStatus.RECEIVED})
    if row is not None:
        conn.execute(q.MARK_EVENT_DEAD_LETTERS_REPLAYED, {"event_id": event_id})
    return row


# --- dead letters and flags -------------------------------------------------------------


def dead_letters(
    conn: Conn,
    *,
    event_type: str | None = None,
    replayed: bool | None = None,
    cursor: int | None = None,
    limit: int = 50,
) -> Page:
    rows = _all(
        conn,
        q.DEAD_LETTERS,
        {"type": event_type, "replayed": replayed, "cursor": cursor, "limit": limit + 1},
    )
    return page(rows, limit, "id")


def dead_letter(conn: Conn, dead_letter_id: int) -> Row | None:
    if not _bigint(dead_letter_id):
        return None
    return _one(conn, q.DEAD_LETTER, {"id": dead_letter_id})


def flags(
    conn: Conn,
    *,
    status: str | None = None,
    failure_code: str | None = None,
    category: str | None = None,
    redemption_id: str | None = None,
    cursor: int | None = None,
    limit: int = 50,
) -> Page:
    rows = _all(
        conn,
        q.FLAGS,
        {
            "status": status,
            "failure_code": failure_code,
            "category": category,
            "redemption_id": redemption_id,
            "cursor": cursor,
            "limit": limit + 1,
        },
    )
    return page(rows, limit, "id")


def flag(conn: Conn, flag_id: int) -> Row | None:
    if not _bigint(flag_id):
        return None
    found = _one(conn, q.FLAG, {"id": flag_id})
    if found is not None:
        found["actions"] = _all(conn, q.FLAG_ACTIONS, {"id": flag_id})
    return found


def resolve_flag(conn: Conn, flag_id: int, note: str | None) -> Row | None:
    """Resolve an open flag; a resolved one is returned unchanged. None when unknown."""
    if not _bigint(flag_id):
        return None
    conn.execute(
        q.RESOLVE_FLAG,
        {"id": flag_id, "note": note, "open": FlagStatus.OPEN, "resolved": FlagStatus.RESOLVED},
    )
    return flag(conn, flag_id)


# --- orders, redemptions, customers -----------------------------------------------------


def order(conn: Conn, order_id: str) -> Row | None:
    row = _one(conn, q.ORDER, {"order_id": order_id})
    if row is None:
        return None
    row["redemptions"] = _all(conn, q.REDEMPTIONS_OF_ORDER, {"order_id": order_id})
    row["events"] = _all(conn, q.EVENTS_OF_ORDER, {"order_id": order_id})
    return row


def redemption(conn: Conn, redemption_id: str) -> Row | None:
    """The redemption with all that happened to it: events, ledger entries, flags, and,
    for a stack's parent, its children."""
    key = {"redemption_id": redemption_id}
    row = _one(conn, q.REDEMPTION, key)
    events_of = _all(conn, q.EVENTS_OF_REDEMPTION, key)
    flags_of = flags(conn, redemption_id=redemption_id, limit=200).items
    if row is None:
        if not (events_of or flags_of):
            return None
        # Only failed or dead events (or a flag) mention it: say so instead of 404.
        row = {"redemption_id": redemption_id, "status": None}
    row["events"] = events_of
    row["ledger_entries"] = _all(conn, q.LEDGER_OF_REDEMPTION, key)
    row["flags"] = flags_of
    row["children"] = _all(conn, q.CHILDREN_OF_REDEMPTION, key)  # a stack's parent's
    return row


def ledger(conn: Conn, customer_id: str, *, cursor: int | None = None, limit: int = 50) -> Row:
    entries = page(
        _all(
            conn,
            q.LEDGER_ENTRIES,
            {"customer_id": customer_id, "cursor": cursor, "limit": limit + 1},
        ),
        limit,
        "id",
    )
    totals = dict.fromkeys(values(LedgerKind), 0)
    for total in _all(conn, q.LEDGER_TOTALS, {"customer_id": customer_id}):
        totals[total["kind"]] = int(total["total"])
    return {
        "customer_id": customer_id,
        "entries": entries.items,
        "totals": totals,
        "next_cursor": entries.next_cursor,
    }


def customer_known(conn: Conn, customer_id: str) -> bool:
    row = _one(conn, q.CUSTOMER_KNOWN, {"customer_id": customer_id})
    return bool(row and row["known"])


def customer(conn: Conn, customer_id: str) -> Row | None:
    if not customer_known(conn, customer_id):
        return None
    row = ledger(conn, customer_id, limit=200)
    row["orders"] = _all(conn, q.ORDERS_OF_CUSTOMER, {"customer_id": customer_id})
    row["redemptions"] = _all(conn, q.REDEMPTIONS_OF_CUSTOMER, {"customer_id": customer_id})
    return row


def search(conn: Conn, text: str) -> Row:
    """Exact-id search: event or delivery id, redemption, rollback or voucher code, order,
    customer."""
    return {
        "q": text,
        "events": _all(conn, q.SEARCH_EVENTS, {"q": text}),
        "redemptions": _all(conn, q.SEARCH_REDEMPTIONS, {"q": text}),
        "orders": _all(conn, q.SEARCH_ORDERS, {"q": text}),
        "customers": [{"customer_id": text}] if customer_known(conn, text) else [],
    }


# --- stats ------------------------------------------------------------------------------


def database_stats(conn: Conn) -> Row:
    by_status = {r["status"]: r["n"] for r in _all(conn, q.EVENTS_BY_STATUS)}
    waiting = waiting_events(conn)
    lag = _one(conn, q.LAG_LAST_HOUR) or {}
    return {
        "events_by_status": {status: by_status.get(status, 0) for status in values(EventStatus)},
        "deliveries_last_hour": {r["outcome"]: r["n"] for r in _all(conn, q.OUTCOMES_LAST_HOUR)},
        "open_flags": open_flags_by_category(conn),
        "unmeasured_cards": unmeasured_cards(conn),
        "dead_letters_pending": pending_dead_letters(conn),
        "waiting_events": waiting.get("n", 0),
        "oldest_waiting_event_age_seconds": waiting.get("age_seconds"),
        "lag_last_hour_seconds": {
            "count": lag.get("n", 0),
            "p50": lag.get("p50"),
            "p95": lag.get("p95"),
            "max": lag.get("max"),
        },
    }


def open_flags_by_category(conn: Conn) -> dict[str, int]:
    rows = _all(conn, q.OPEN_FLAGS_BY_CATEGORY, {"open": FlagStatus.OPEN})
    counts = {r["category"]: r["n"] for r in rows}
    return {c: int(counts.get(c, 0)) for c in values(FlagCategory)}


def unmeasured_cards(conn: Conn) -> dict[str, int]:
    """Cards by kind that no event has reported a balance of yet (drift cannot measure them)."""
    counts = {r["kind"]: int(r["n"]) for r in _all(conn, q.UNMEASURED_CARDS)}
    return {kind: counts.get(kind, 0) for kind in values(LedgerKind)}


def pending_dead_letters(conn: Conn) -> int:
    row = _one(conn, q.PENDING_DEAD_LETTERS)
    return int(row["n"]) if row else 0


def waiting_events(conn: Conn) -> Row:
    """``n`` events not finished, the oldest ``age_seconds`` old (None when none waits)."""
    row = _one(conn, q.OLDEST_WAITING, {"statuses": _texts(UNFINISHED_STATUSES)})
    return row or {"n": 0, "age_seconds": None}


def per_minute(conn: Conn, minutes: int) -> list[Row]:
    """Deliveries per minute by outcome and the p95 lag of the events processed that minute,
    for the last ``minutes`` minutes (oldest first, minutes without traffic included)."""
    counts: dict[datetime, dict[str, int]] = {}
    for r in _all(conn, q.DELIVERIES_PER_MINUTE, {"minutes": minutes}):
        counts.setdefault(r["minute"], {})[r["outcome"]] = r["n"]
    lags = {r["minute"]: r["p95"] for r in _all(conn, q.LAG_PER_MINUTE, {"minutes": minutes})}
    now_row = _one(conn, q.CURRENT_MINUTE)
    assert now_row is not None
    last: datetime = now_row["minute"]
    return [
        {
            "minute": minute,
            "outcomes": counts.get(minute, {}),
            "total": sum(counts.get(minute, {}).values()),
            "lag_p95_seconds": lags.get(minute),
        }
        for minute in (last - timedelta(minutes=i) for i in range(minutes - 1, -1, -1))
    ]
