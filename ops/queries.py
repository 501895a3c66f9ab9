"""All the SQL the ops API, the dashboard and the CLI run, kept together.

Named queries with ``%(name)s`` parameters, never string formatting of values; one small
function per question, taking the connection of the caller's transaction and returning
plain dicts (column name -> value). Lists are keyset-paginated: ``fetch limit + 1`` rows
and the caller turns the extra row into ``next_cursor`` (see ``page``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

from ops.params import EVENT_STATUSES, FLAG_CATEGORIES

Row = dict[str, Any]

# --- events ---------------------------------------------------------------------------

EVENT = """
SELECT event_id, type, status, attempts, last_error, received_at, processed_at,
       event_created_at, updated_at, redrives,
       payload IS NOT NULL AS has_payload,
       payload #>> '{data,redemption,id}' AS redemption_id,
       payload #>> '{data,order,id}' AS order_id,
       payload #>> '{data,customer,id}' AS customer_id
FROM events
WHERE event_id = %(event_id)s
"""

EVENT_DELIVERIES = """
SELECT delivery_id, received_at, recorded_at, outcome
FROM deliveries
WHERE event_id = %(event_id)s
ORDER BY received_at, delivery_id
"""

EVENT_DEAD_LETTERS = """
SELECT id, event_id, delivery_id, type, reason, created_at, replayed_at
FROM dead_letters
WHERE event_id = %(event_id)s
ORDER BY id
"""

# Newest first; the cursor is the (received_at, event_id) of the last row seen.
EVENTS = """
SELECT event_id, type, status, attempts, last_error, received_at, processed_at,
       payload IS NOT NULL AS has_payload
FROM events
WHERE (%(statuses)s::text[] IS NULL OR status = ANY(%(statuses)s::text[]))
  AND (%(type)s::text IS NULL OR type = %(type)s::text)
  AND (%(since)s::timestamptz IS NULL OR received_at >= %(since)s::timestamptz)
  AND (%(until)s::timestamptz IS NULL OR received_at < %(until)s::timestamptz)
  AND (%(cursor_at)s::timestamptz IS NULL
       OR (received_at, event_id) < (%(cursor_at)s::timestamptz, %(cursor_id)s::text))
ORDER BY received_at DESC, event_id DESC
LIMIT %(limit)s
"""

# What a replay by range walks through: oldest first, so events go back in natural order.
EVENTS_TO_REPLAY = """
SELECT event_id, type, status, received_at, payload IS NOT NULL AS has_payload
FROM events
WHERE (%(statuses)s::text[] IS NULL OR status = ANY(%(statuses)s::text[]))
  AND received_at >= %(since)s::timestamptz
  AND (%(until)s::timestamptz IS NULL OR received_at < %(until)s::timestamptz)
  AND (%(cursor_at)s::timestamptz IS NULL
       OR (received_at, event_id) > (%(cursor_at)s::timestamptz, %(cursor_id)s::text))
ORDER BY received_at, event_id
LIMIT %(limit)s
"""

# The events of a redemption or an order (expression indexes in 0004_ops_lookups.sql).
EVENTS_OF_REDEMPTION = """
SELECT event_id, type, status, attempts, last_error, received_at, processed_at
FROM events
WHERE payload #>> '{data,redemption,id}' = %(redemption_id)s
ORDER BY received_at, event_id
LIMIT 200
"""

EVENTS_OF_ORDER = """
SELECT event_id, type, status, attempts, last_error, received_at, processed_at
FROM events
WHERE payload #>> '{data,order,id}' = %(order_id)s
ORDER BY received_at, event_id
LIMIT 200
"""

# Sets a final (or failed) event back to 'received' so the worker applies it again
# instead of recording a duplicate; the row stays locked until the caller commits, so a
# worker that takes the re-queued message first waits for the commit.
REQUEUE_EVENT = """
UPDATE events AS e
SET status = 'received', updated_at = now()
FROM (SELECT event_id, status FROM events WHERE event_id = %(event_id)s FOR UPDATE) AS old
WHERE e.event_id = old.event_id AND e.payload IS NOT NULL
RETURNING e.event_id, e.type, old.status AS previous_status, e.payload::text AS payload
"""

MARK_EVENT_DEAD_LETTERS_REPLAYED = """
UPDATE dead_letters SET replayed_at = now()
WHERE event_id = %(event_id)s AND replayed_at IS NULL
"""

# --- dead letters ---------------------------------------------------------------------

DEAD_LETTERS = """
SELECT d.id, d.event_id, d.delivery_id, d.type, d.reason, d.created_at, d.replayed_at,
       e.status AS event_status
FROM dead_letters AS d
JOIN events AS e USING (event_id)
WHERE (%(type)s::text IS NULL OR d.type = %(type)s::text)
  AND (%(replayed)s::boolean IS NULL OR (d.replayed_at IS NOT NULL) = %(replayed)s::boolean)
  AND (%(cursor)s::bigint IS NULL OR d.id < %(cursor)s::bigint)
ORDER BY d.id DESC
LIMIT %(limit)s
"""

DEAD_LETTER = """
SELECT d.id, d.event_id, d.delivery_id, d.type, d.reason, d.created_at, d.replayed_at,
       e.status AS event_status, e.payload IS NOT NULL AS has_payload
FROM dead_letters AS d
JOIN events AS e USING (event_id)
WHERE d.id = %(id)s
"""

# --- flags ----------------------------------------------------------------------------

FLAG_COLUMNS = """id, category, redemption_id, rollback_id, voucher_id, failure_code,
       failure_message, event_id, status, note, created_at, resolved_at"""

FLAGS = f"""
SELECT {FLAG_COLUMNS}
FROM flags
WHERE (%(status)s::text IS NULL OR status = %(status)s::text)
  AND (%(failure_code)s::text IS NULL OR failure_code = %(failure_code)s::text)
  AND (%(category)s::text IS NULL OR category = %(category)s::text)
  AND (%(redemption_id)s::text IS NULL OR redemption_id = %(redemption_id)s::text)
  AND (%(cursor)s::bigint IS NULL OR id < %(cursor)s::bigint)
ORDER BY id DESC
LIMIT %(limit)s
"""  # noqa: S608 - FLAG_COLUMNS is a constant of this module, values are parameters

FLAG = f"SELECT {FLAG_COLUMNS} FROM flags WHERE id = %(id)s"  # noqa: S608 - constant columns

# A state transition that only moves forward: resolving twice changes nothing.
RESOLVE_FLAG = """
UPDATE flags SET status = 'resolved', note = %(note)s, resolved_at = now()
WHERE id = %(id)s AND status = 'open'
"""

# --- orders, redemptions, ledger ------------------------------------------------------

ORDER = """
SELECT order_id, status, amount, total_amount, customer_id, source_updated_at,
       created_at, updated_at
FROM orders
WHERE order_id = %(order_id)s
"""

REDEMPTION_COLUMNS = """redemption_id, status, parent_redemption_id, order_id, customer_id,
       voucher_id, voucher_code, voucher_type, amount, redeemed_at, failure_code,
       failure_message, rollback_id, rollback_at, rollback_reason, last_event_at,
       created_at, updated_at"""

REDEMPTION = f"""
SELECT {REDEMPTION_COLUMNS} FROM redemptions WHERE redemption_id = %(redemption_id)s
"""  # noqa: S608 - constant columns

REDEMPTIONS_OF_ORDER = f"""
SELECT {REDEMPTION_COLUMNS} FROM redemptions WHERE order_id = %(order_id)s
ORDER BY redeemed_at NULLS LAST, redemption_id
LIMIT 200
"""  # noqa: S608 - constant columns

REDEMPTIONS_OF_CUSTOMER = f"""
SELECT {REDEMPTION_COLUMNS} FROM redemptions WHERE customer_id = %(customer_id)s
ORDER BY redeemed_at DESC NULLS LAST, redemption_id
LIMIT 200
"""  # noqa: S608 - constant columns

ORDERS_OF_CUSTOMER = """
SELECT order_id, status, amount, total_amount, customer_id, source_updated_at,
       created_at, updated_at
FROM orders WHERE customer_id = %(customer_id)s
ORDER BY source_updated_at DESC NULLS LAST, order_id
LIMIT 200
"""

LEDGER_COLUMNS = """id, customer_id, voucher_id, voucher_code, kind, amount, redemption_id,
       effect, reason, event_id, created_at"""

LEDGER_ENTRIES = f"""
SELECT {LEDGER_COLUMNS}
FROM ledger_entries
WHERE customer_id = %(customer_id)s
  AND (%(cursor)s::bigint IS NULL OR id > %(cursor)s::bigint)
ORDER BY id
LIMIT %(limit)s
"""  # noqa: S608 - constant columns

LEDGER_OF_REDEMPTION = f"""
SELECT {LEDGER_COLUMNS} FROM ledger_entries WHERE redemption_id = %(redemption_id)s ORDER BY id
"""  # noqa: S608 - constant columns

LEDGER_TOTALS = """
SELECT kind, sum(amount)::bigint AS total
FROM ledger_entries
WHERE customer_id = %(customer_id)s
GROUP BY kind
"""

CUSTOMER_KNOWN = """
SELECT EXISTS (SELECT 1 FROM ledger_entries WHERE customer_id = %(customer_id)s)
    OR EXISTS (SELECT 1 FROM orders WHERE customer_id = %(customer_id)s)
    OR EXISTS (SELECT 1 FROM redemptions WHERE customer_id = %(customer_id)s) AS known
"""

# --- search ---------------------------------------------------------------------------

SEARCH_EVENTS = """
SELECT event_id, type, status FROM events WHERE event_id = %(q)s
UNION
SELECT e.event_id, e.type, e.status
FROM deliveries AS d JOIN events AS e USING (event_id)
WHERE d.delivery_id = %(q)s
"""

SEARCH_REDEMPTIONS = """
SELECT redemption_id, status, order_id, customer_id, voucher_code
FROM redemptions
WHERE redemption_id = %(q)s OR rollback_id = %(q)s OR voucher_code = %(q)s
ORDER BY redemption_id
LIMIT 50
"""

SEARCH_ORDERS = """
SELECT order_id, status, customer_id FROM orders WHERE order_id = %(q)s
"""

# --- stats ----------------------------------------------------------------------------

EVENTS_BY_STATUS = "SELECT status, count(*) AS n FROM events GROUP BY status"

OPEN_FLAGS_BY_CATEGORY = """
SELECT category, count(*) AS n FROM flags WHERE status = 'open' GROUP BY category
"""

PENDING_DEAD_LETTERS = "SELECT count(*) AS n FROM dead_letters WHERE replayed_at IS NULL"

# Events whose processing has not finished ('received' or 'failed'), oldest first.
OLDEST_WAITING = """
SELECT extract(epoch FROM now() - min(received_at))::float8 AS age_seconds,
       count(*) AS n
FROM events
WHERE status IN ('received', 'failed')
"""

DELIVERIES_PER_MINUTE = """
SELECT date_trunc('minute', received_at) AS minute, outcome, count(*) AS n
FROM deliveries
WHERE received_at >= date_trunc('minute', now()) - make_interval(mins => %(minutes)s - 1)
GROUP BY 1, 2
ORDER BY 1, 2
"""

LAG_PER_MINUTE = """
SELECT date_trunc('minute', processed_at) AS minute,
       percentile_cont(0.95) WITHIN GROUP (
           ORDER BY extract(epoch FROM processed_at - received_at))::float8 AS p95
FROM events
WHERE received_at >= date_trunc('minute', now()) - make_interval(mins => %(minutes)s + 60)
  AND processed_at >= date_trunc('minute', now()) - make_interval(mins => %(minutes)s - 1)
GROUP BY 1
"""

LAG_LAST_HOUR = """
SELECT count(*) AS n,
       percentile_cont(0.5) WITHIN GROUP (
           ORDER BY extract(epoch FROM processed_at - received_at))::float8 AS p50,
       percentile_cont(0.95) WITHIN GROUP (
           ORDER BY extract(epoch FROM processed_at - received_at))::float8 AS p95,
       max(extract(epoch FROM processed_at - received_at))::float8 AS max
FROM events
WHERE received_at >= now() - interval '2 hours'
  AND processed_at >= now() - interval '1 hour'
"""

OUTCOMES_LAST_HOUR = """
SELECT outcome, count(*) AS n FROM deliveries
WHERE received_at >= now() - interval '1 hour'
GROUP BY outcome
"""


# --- functions ------------------------------------------------------------------------

Conn = psycopg.Connection[Any]


def _one(conn: Conn, query: str, params: dict[str, Any]) -> Row | None:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params)
        return cur.fetchone()


def _all(conn: Conn, query: str, params: dict[str, Any] | None = None) -> list[Row]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params or {})
        return cur.fetchall()


@dataclass(frozen=True, slots=True)
class Page:
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


def event(conn: Conn, event_id: str) -> Row | None:
    row = _one(conn, EVENT, {"event_id": event_id})
    if row is None:
        return None
    deliveries = _all(conn, EVENT_DELIVERIES, {"event_id": event_id})
    row["deliveries"] = deliveries
    row["delivery_ids"] = [d["delivery_id"] for d in deliveries]
    row["dead_letters"] = _all(conn, EVENT_DEAD_LETTERS, {"event_id": event_id})
    return row


def events(
    conn: Conn,
    *,
    statuses: list[str] | None = None,
    event_type: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: tuple[datetime, str] | None = None,
    limit: int = 50,
) -> tuple[list[Row], tuple[datetime, str] | None]:
    rows = _all(
        conn,
        EVENTS,
        {
            "statuses": statuses or None,
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
        return rows, (rows[-1]["received_at"], rows[-1]["event_id"])
    return rows, None


def events_to_replay(
    conn: Conn,
    *,
    since: datetime,
    until: datetime | None,
    statuses: list[str] | None,
    after: tuple[datetime, str] | None,
    limit: int,
) -> list[Row]:
    return _all(
        conn,
        EVENTS_TO_REPLAY,
        {
            "statuses": statuses or None,
            "since": since,
            "until": until,
            "cursor_at": after[0] if after else None,
            "cursor_id": after[1] if after else None,
            "limit": limit,
        },
    )


def requeue_event(conn: Conn, event_id: str) -> Row | None:
    """Set the event back to 'received' (row locked until commit); None without a payload."""
    row = _one(conn, REQUEUE_EVENT, {"event_id": event_id})
    if row is not None:
        conn.execute(MARK_EVENT_DEAD_LETTERS_REPLAYED, {"event_id": event_id})
    return row


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
        DEAD_LETTERS,
        {"type": event_type, "replayed": replayed, "cursor": cursor, "limit": limit + 1},
    )
    return page(rows, limit, "id")


def _bigint(value: int) -> bool:
    return 0 < value < 2**63


def dead_letter(conn: Conn, dead_letter_id: int) -> Row | None:
    if not _bigint(dead_letter_id):
        return None
    return _one(conn, DEAD_LETTER, {"id": dead_letter_id})


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
        FLAGS,
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
    return _one(conn, FLAG, {"id": flag_id})


def resolve_flag(conn: Conn, flag_id: int, note: str | None) -> Row | None:
    """Resolve an open flag; a resolved one is returned unchanged. None when unknown."""
    if not _bigint(flag_id):
        return None
    conn.execute(RESOLVE_FLAG, {"id": flag_id, "note": note})
    return flag(conn, flag_id)


def order(conn: Conn, order_id: str) -> Row | None:
    row = _one(conn, ORDER, {"order_id": order_id})
    if row is None:
        return None
    row["redemptions"] = _all(conn, REDEMPTIONS_OF_ORDER, {"order_id": order_id})
    row["events"] = _all(conn, EVENTS_OF_ORDER, {"order_id": order_id})
    return row


def redemption(conn: Conn, redemption_id: str) -> Row | None:
    """The redemption with all that happened to it: events, ledger entries, flags."""
    row = _one(conn, REDEMPTION, {"redemption_id": redemption_id})
    events_of = _all(conn, EVENTS_OF_REDEMPTION, {"redemption_id": redemption_id})
    flags_of = flags(conn, redemption_id=redemption_id, limit=200).items
    if row is None:
        if not (events_of or flags_of):
            return None
        # Only failed or dead events (or a flag) mention it: say so instead of 404.
        row = {"redemption_id": redemption_id, "status": None}
    row["events"] = events_of
    row["ledger_entries"] = _all(conn, LEDGER_OF_REDEMPTION, {"redemption_id": redemption_id})
    row["flags"] = flags_of
    return row


def ledger(conn: Conn, customer_id: str, *, cursor: int | None = None, limit: int = 50) -> Row:
    entries = page(
        _all(
            conn,
            LEDGER_ENTRIES,
            {"customer_id": customer_id, "cursor": cursor, "limit": limit + 1},
        ),
        limit,
        "id",
    )
    totals = {"gift_credit": 0, "loyalty_points": 0}
    for total in _all(conn, LEDGER_TOTALS, {"customer_id": customer_id}):
        totals[total["kind"]] = int(total["total"])
    return {
        "customer_id": customer_id,
        "entries": entries.items,
        "totals": totals,
        "next_cursor": entries.next_cursor,
    }


def customer_known(conn: Conn, customer_id: str) -> bool:
    row = _one(conn, CUSTOMER_KNOWN, {"customer_id": customer_id})
    return bool(row and row["known"])


def customer(conn: Conn, customer_id: str) -> Row | None:
    if not customer_known(conn, customer_id):
        return None
    row = ledger(conn, customer_id, limit=200)
    row["orders"] = _all(conn, ORDERS_OF_CUSTOMER, {"customer_id": customer_id})
    row["redemptions"] = _all(conn, REDEMPTIONS_OF_CUSTOMER, {"customer_id": customer_id})
    return row


def search(conn: Conn, q: str) -> Row:
    """Exact-id search: event or delivery id, redemption, rollback or voucher code, order,
    customer."""
    return {
        "q": q,
        "events": _all(conn, SEARCH_EVENTS, {"q": q}),
        "redemptions": _all(conn, SEARCH_REDEMPTIONS, {"q": q}),
        "orders": _all(conn, SEARCH_ORDERS, {"q": q}),
        "customers": [{"customer_id": q}] if customer_known(conn, q) else [],
    }


def database_stats(conn: Conn) -> Row:
    by_status = {r["status"]: r["n"] for r in _all(conn, EVENTS_BY_STATUS)}
    waiting = waiting_events(conn)
    lag = _one(conn, LAG_LAST_HOUR, {}) or {}
    return {
        "events_by_status": {status: by_status.get(status, 0) for status in EVENT_STATUSES},
        "deliveries_last_hour": {r["outcome"]: r["n"] for r in _all(conn, OUTCOMES_LAST_HOUR)},
        "open_flags": open_flags_by_category(conn),
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
    counts = {r["category"]: r["n"] for r in _all(conn, OPEN_FLAGS_BY_CATEGORY)}
    return {c: int(counts.get(c, 0)) for c in FLAG_CATEGORIES}


def pending_dead_letters(conn: Conn) -> int:
    row = _one(conn, PENDING_DEAD_LETTERS, {})
    return int(row["n"]) if row else 0


def waiting_events(conn: Conn) -> Row:
    """``n`` events not finished, the oldest ``age_seconds`` old (None when none waits)."""
    return _one(conn, OLDEST_WAITING, {}) or {"n": 0, "age_seconds": None}


def per_minute(conn: Conn, minutes: int) -> list[Row]:
    """Deliveries per minute by outcome and the p95 lag of the events processed that minute,
    for the last ``minutes`` minutes (oldest first, minutes without traffic included)."""
    counts: dict[datetime, dict[str, int]] = {}
    for r in _all(conn, DELIVERIES_PER_MINUTE, {"minutes": minutes}):
        counts.setdefault(r["minute"], {})[r["outcome"]] = r["n"]
    lags = {r["minute"]: r["p95"] for r in _all(conn, LAG_PER_MINUTE, {"minutes": minutes})}
    now_row = _one(conn, "SELECT date_trunc('minute', now()) AS m", {})
    assert now_row is not None
    last: datetime = now_row["m"]
    return [
        {
            "minute": minute,
            "outcomes": counts.get(minute, {}),
            "total": sum(counts.get(minute, {}).values()),
            "lag_p95_seconds": lags.get(minute),
        }
        for minute in (last - timedelta(minutes=i) for i in range(minutes - 1, -1, -1))
    ]
