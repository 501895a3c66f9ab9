"""Apply one delivery: record it in the inbox and, unless its event was seen, apply the event.

Everything for one delivery happens in one transaction: the inbox row of the event is
claimed (inserted, or locked when it exists: a concurrent duplicate waits here), the
handler's effects are written, and the event's final status and the delivery row are
written last. They commit together or not at all.

Outcomes: ``processed``; ``duplicate`` (the event was already applied, ignored or dead:
the delivery is recorded, nothing is applied); ``ignored`` (no handler for the type);
``dead`` (the payload failed validation, or holds what PostgreSQL cannot store: a
dead-letter row with a short reason, no retry). Transient faults raise ``TransientError``
after the transaction rolled back; the task decides when to retry.

Hostile input ends final and visible at its first attempt, never in a loop:

- An event id or type PostgreSQL cannot store or index (a NUL, a lone surrogate, longer
  than ``MAX_ID_LENGTH``) is stored sanitised (``storable``) and the delivery
  dead-lettered at once; a body nested deeper than ``MAX_NESTING`` too, whatever the
  stack depth of the process reading it.
- What the database refuses for what the payload holds (SQLSTATE classes 22, 23 and 54,
  ``UnicodeError``, ``RecursionError``, values psycopg cannot adapt: ``refusal``) is a
  dead letter with a short reason naming the problem, never the server's text (it
  quotes the body) nor payload content.
- The raw body is kept beside the event: in ``payload`` (jsonb) when PostgreSQL takes it,
  else in ``raw_body`` (text, byte for byte), else -- a body text cannot hold -- nowhere.
- A later delivery never changes a final event: it is recorded as a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import psycopg
from marshmallow import ValidationError
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from schemas.envelope import LEGACY_FORMAT, Envelope, read_envelope
from schemas.vocabulary import FINAL_STATUSES, UNFINISHED_STATUSES, DeliveryOutcome, EventStatus
from workers import handlers  # noqa: F401 - importing registers the handlers
from workers.queue.body import MAX_NESTING, nests_deeper_than
from workers.registry import Registry, registry

log = logging.getLogger(__name__)

SETTLED = (EventStatus.PROCESSED, EventStatus.IGNORED)
"""Final statuses that stamp ``processed_at``: the event was applied or had nothing to apply."""

# psycopg_pool.PoolTimeout, SerializationFailure and DeadlockDetected are all
# OperationalErrors: the database is unreachable, busy, or asked us to try again. (So is
# class 54, program limit exceeded: ``refusal`` sorts that out first, as permanent.)
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (psycopg.OperationalError,)

STORAGE_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.Error,
    UnicodeError,
    RecursionError,
    OverflowError,
)
"""What storing a payload can raise; ``refusal`` says which of them are about the payload."""

PERMANENT_SQLSTATE_CLASSES = {
    "22": "data exception",
    "23": "integrity constraint violation",
    "54": "program limit exceeded",
}
"""SQLSTATE classes the database answers for what a payload holds: the same every time."""

MAX_ID_LENGTH = 255
"""Longest event id or type stored as it came: far below the btree limit (2704 bytes) even
in four-byte characters. Longer ones are stored cut, with a hash (``storable``)."""

BodyForm = Literal["jsonb", "text", "none"]
"""Where an event's raw body is stored: ``payload`` (jsonb), ``raw_body`` (text), or not at all."""

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
"""Characters no PostgreSQL text can hold: NUL, and surrogates (not encodable as UTF-8)."""
_SURROGATE = re.compile("[\ud800-\udfff]")

CLAIM_EVENT = """
INSERT INTO events AS e (event_id, type, payload, raw_body, event_created_at, received_at)
VALUES (%(event_id)s, %(type)s, %(payload)s::jsonb, %(raw_body)s, %(event_created_at)s,
        %(received_at)s)
ON CONFLICT (event_id) DO UPDATE SET updated_at = now()  -- takes the row lock
RETURNING status
"""

FINISH_EVENT = """
WITH finished AS (
    UPDATE events
    SET status = %(status)s,
        attempts = attempts + 1,
        processed_at = CASE WHEN %(settled)s THEN now() END,
        last_error = %(error)s,
        updated_at = now()
    WHERE event_id = %(event_id)s
)
INSERT INTO deliveries (delivery_id, event_id, received_at, outcome)
VALUES (%(delivery_id)s, %(event_id)s, %(received_at)s, %(outcome)s)
ON CONFLICT (delivery_id) DO UPDATE SET outcome = EXCLUDED.outcome
"""

RECORD_DUPLICATE = """
INSERT INTO deliveries (delivery_id, event_id, received_at, outcome)
VALUES (%(delivery_id)s, %(event_id)s, %(received_at)s, %(outcome)s)
ON CONFLICT (delivery_id) DO NOTHING
"""

INSERT_DEAD_LETTER = """
INSERT INTO dead_letters (event_id, delivery_id, type, reason)
VALUES (%(event_id)s, %(delivery_id)s, %(type)s, %(reason)s)
"""

# An event already final is not touched (the WHERE of the upsert): its delivery is then a
# duplicate, as when the worker's own claim finds it final.
RECORD_FAILURE = """
WITH failed AS (
    INSERT INTO events AS e (event_id, type, payload, raw_body, event_created_at, received_at,
                             status, attempts, last_error)
    VALUES (%(event_id)s, %(type)s, %(payload)s::jsonb, %(raw_body)s, %(event_created_at)s,
            %(received_at)s, %(status)s, 1, %(error)s)
    ON CONFLICT (event_id) DO UPDATE
    SET status = %(status)s, attempts = e.attempts + 1, last_error = EXCLUDED.last_error,
        updated_at = now()
    WHERE e.status = ANY(%(unfinished)s)
    RETURNING e.event_id
)
INSERT INTO deliveries (delivery_id, event_id, received_at, outcome)
SELECT %(delivery_id)s::text, %(event_id)s::text, %(received_at)s::timestamptz,
       CASE WHEN EXISTS (SELECT FROM failed) THEN %(outcome)s ELSE %(duplicate)s END
ON CONFLICT (delivery_id) DO NOTHING
"""


class TransientError(Exception):
    """The delivery could not be applied now; trying again later may work."""


@dataclass(frozen=True, slots=True)
class Outcome:
    status: DeliveryOutcome
    event_id: str
    type: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message from the receiver, identified enough to be recorded."""

    delivery_id: str
    received_at: datetime
    body: str
    document: dict[str, Any] | None
    envelope: Envelope | None
    event_id: str
    """``event.id``, else the envelope id, else ``delivery:<delivery id>``; storable."""
    type: str
    """The event type ('' when none); storable."""
    refused: str | None = None
    """Why the delivery cannot be stored as it came (an id, its nesting): dead at once."""
    jsonb: bool = True
    """Whether ``payload`` (jsonb) may be asked to take the body: a JSON object not too deep."""

    def body_forms(self) -> Iterator[BodyForm]:
        """Where to try to keep the body, best first; the last one always fits."""
        if self.jsonb:
            yield "jsonb"
        if self.body and _UNSTORABLE.search(self.body) is None:
            yield "text"
        yield "none"

    def inbox_params(self, form: BodyForm | None = None) -> dict[str, Any]:
        form = form or next(self.body_forms())
        return {
            "event_id": self.event_id,
            "type": self.type,
            "payload": self.body if form == "jsonb" else None,
            "raw_body": self.body if form == "text" else None,
            "event_created_at": _parse_time(
                self.envelope.event_created_at if self.envelope else None
            ),
            "received_at": self.received_at,
            "delivery_id": self.delivery_id,
        }


def read_delivery(body: str, delivery_id: str, received_at: str) -> Delivery:
    """What a delivery is, never raising: a body that is not a JSON object has no envelope."""
    too_deep = nests_deeper_than(MAX_NESTING, body.encode("utf-8", "surrogatepass"))
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the stack
        document = None
    if not isinstance(document, dict):
        document = None
    envelope = read_envelope(document) if document is not None else None
    delivery_id, _ = storable(delivery_id, "delivery id")
    event_id, id_problem = storable(
        envelope.event_id if envelope and envelope.event_id else f"delivery:{delivery_id}",
        "event id",
    )
    event_type, type_problem = storable(envelope.type if envelope else "", "event type")
    problem = id_problem or type_problem
    if problem is None and too_deep:
        problem = f"JSON nested over {MAX_NESTING} levels deep"
    return Delivery(
        delivery_id=delivery_id,
        received_at=_parse_time(received_at) or datetime.now(UTC),
        body=body,
        document=document,
        envelope=envelope,
        event_id=event_id,
        type=event_type,
        refused=f"not storable: {problem}" if problem else None,
        jsonb=document is not None and not too_deep,
    )


def storable(text: str, what: str) -> tuple[str, str | None]:
    """``text`` as PostgreSQL can store and index it, and what had to change (None: nothing).

    NUL characters and lone surrogates become U+FFFD, and the text is cut to
    ``MAX_ID_LENGTH`` with a hash of the original at the end, so two different ids never
    end as one: a later delivery of the same event finds the same row.
    """
    if "\x00" in text:
        problem = f"the {what} holds a NUL character"
    elif _SURROGATE.search(text):
        problem = f"the {what} holds a lone surrogate"
    elif len(text) > MAX_ID_LENGTH:
        problem = f"the {what} is over {MAX_ID_LENGTH} characters"
    else:
        return text, None
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    kept = _UNSTORABLE.sub("\ufffd", text)[: MAX_ID_LENGTH - len(digest) - 1]
    return f"{kept}~{digest}", problem


def _parse_time(text: str | None) -> datetime | None:
    """An ISO 8601 time as PostgreSQL can store it (in UTC; naive taken as UTC), else None."""
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (ValueError, OverflowError):  # +25:00, year 0, or out of range once in UTC
        return None


def refusal(exc: BaseException) -> str | None:
    """The short reason the database or psycopg refused what a payload holds; None when
    ``exc`` is not about the payload (a transient fault, or a bug).

    Names the problem, never quotes it: the server's message text quotes the body.
    """
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate
        if state:
            kind = PERMANENT_SQLSTATE_CLASSES.get(state[:2])
            if kind is None:
                return None
            return f"rejected by the database: SQLSTATE {state} (class {state[:2]}, {kind})"
        # Raised by psycopg itself, before sending: its own fixed text, never the payload.
        if isinstance(exc, psycopg.DataError):
            what = "a NUL character in a string" if "NUL" in str(exc) else "a value psycopg refuses"
            return f"not storable: {what} (DataError)"
        if isinstance(exc, psycopg.ProgrammingError) and str(exc).startswith("cannot adapt"):
            return "not storable: a value psycopg cannot adapt (ProgrammingError)"
        return None
    if isinstance(exc, UnicodeEncodeError):
        return "not storable: lone surrogate in a string (UnicodeEncodeError)"
    if isinstance(exc, UnicodeDecodeError):
        return "not storable: invalid UTF-8 (UnicodeDecodeError)"
    if isinstance(exc, RecursionError):
        return "not storable: nested too deeply (RecursionError)"
    if isinstance(exc, OverflowError):
        return "not storable: a date or number out of range (OverflowError)"
    return None


def describe(exc: BaseException) -> str:
    """A short text of an error for ``last_error`` and log lines: the server's message only
    when it cannot quote a payload (client-side faults: connection, pool timeout)."""
    name = type(exc).__name__
    if isinstance(exc, psycopg.Error):
        if exc.sqlstate:
            return f"{name} (SQLSTATE {exc.sqlstate})"
        return _UNSTORABLE.sub("\ufffd", f"{name}: {exc}")[:500]
    if isinstance(exc, TransientError):
        return str(exc)
    return name


def process_delivery(
    pool: ConnectionPool,
    body: str,
    delivery_id: str,
    received_at: str,
    routes: Registry = registry,
) -> Outcome:
    delivery = read_delivery(body, delivery_id, received_at)
    try:
        reason = delivery.refused
        if reason is None:
            try:
                # Pipeline mode: statements go out without waiting for each answer; only
                # the claim is waited for. One delivery costs two round trips, not ten.
                with pool.connection() as conn, conn.pipeline(), conn.transaction():
                    return _apply(conn, delivery, routes)
            except STORAGE_ERRORS as exc:
                reason = refusal(exc)
                if reason is None:
                    raise
        # Permanent: the failed transaction is gone; dead-letter in a fresh one.
        with pool.connection() as conn, conn.transaction():
            return _dead_letter(conn, delivery, reason)
    except TRANSIENT_ERRORS as exc:
        raise TransientError(describe(exc)) from exc


def record_dead_letter(
    pool: ConnectionPool, body: str, delivery_id: str, received_at: str, reason: str
) -> Outcome:
    """Dead-letter a delivery for a reason of the caller's (the accepted-set sweep gave up
    on it), its event kept with its body; a duplicate when its event is already final.
    Raises ``TransientError`` when PostgreSQL cannot be reached."""
    delivery = read_delivery(body, delivery_id, received_at)
    try:
        with pool.connection() as conn, conn.transaction():
            return _dead_letter(conn, delivery, reason)
    except TRANSIENT_ERRORS as exc:
        raise TransientError(describe(exc)) from exc


def _apply(conn: psycopg.Connection[Any], delivery: Delivery, routes: Registry) -> Outcome:
    params = delivery.inbox_params()
    row = conn.cursor(row_factory=dict_row).execute(CLAIM_EVENT, params).fetchone()
    assert row is not None
    event_id, event_type = delivery.event_id, delivery.type
    if row["status"] in FINAL_STATUSES:
        conn.execute(RECORD_DUPLICATE, {**params, "outcome": DeliveryOutcome.DUPLICATE})
        return Outcome(DeliveryOutcome.DUPLICATE, event_id, event_type)

    reason = _unusable(delivery)
    route = routes.route(event_type) if reason is None else None
    if reason is None and route is None:
        _finish(conn, params, EventStatus.IGNORED)
        return Outcome(DeliveryOutcome.IGNORED, event_id, event_type)
    if route is not None:
        assert delivery.envelope is not None
        try:
            event = route.load(
                event_id, event_type, delivery.envelope.event_created_at, delivery.envelope.data
            )
        except ValidationError as exc:
            reason = f"validation failed: {json.dumps(exc.messages, sort_keys=True)}"
        else:
            route.handle(event, conn)
    if reason is not None:
        _finish(conn, params, EventStatus.DEAD, error=reason)
        conn.execute(INSERT_DEAD_LETTER, {**params, "reason": reason})
        return Outcome(DeliveryOutcome.DEAD, event_id, event_type, reason)
    _finish(conn, params, EventStatus.PROCESSED)
    return Outcome(DeliveryOutcome.PROCESSED, event_id, event_type)


def _dead_letter(conn: psycopg.Connection[Any], delivery: Delivery, reason: str) -> Outcome:
    """The event (claimed with its body in the first form PostgreSQL takes) dead, with a
    dead letter; unless it is final already: then this delivery is only a duplicate."""
    event_id, event_type = delivery.event_id, delivery.type
    params, cursor = _execute_with_body(conn, delivery, CLAIM_EVENT)
    row = cursor.fetchone()
    assert row is not None
    if row[0] in FINAL_STATUSES:
        conn.execute(RECORD_DUPLICATE, {**params, "outcome": DeliveryOutcome.DUPLICATE})
        return Outcome(DeliveryOutcome.DUPLICATE, event_id, event_type)
    _finish(conn, params, EventStatus.DEAD, error=reason)
    conn.execute(INSERT_DEAD_LETTER, {**params, "reason": reason})
    return Outcome(DeliveryOutcome.DEAD, event_id, event_type, reason)


def _execute_with_body(
    conn: psycopg.Connection[Any],
    delivery: Delivery,
    query: str,
    words: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], psycopg.Cursor[Any]]:
    """Run an upsert of the event with its body as jsonb, else as text, else without it
    (each try but the last in a savepoint); the params it ran with, and its cursor. The
    ids are storable, so the last try fits."""
    *forms, last = delivery.body_forms()
    for form in forms:
        params = {**delivery.inbox_params(form), **(words or {})}
        try:
            with conn.transaction():
                return params, conn.execute(query, params)
        except STORAGE_ERRORS as exc:
            if refusal(exc) is None:
                raise
    params = {**delivery.inbox_params(last), **(words or {})}
    return params, conn.execute(query, params)


def _unusable(delivery: Delivery) -> str | None:
    """Why a delivery can never be applied, before looking at its type; None when it can."""
    if delivery.refused is not None:
        return delivery.refused
    if delivery.document is None:
        return "body is not a JSON object"
    assert delivery.envelope is not None
    if delivery.envelope.format == LEGACY_FORMAT:
        return (
            "webhook version v2018-08-01 is not supported: switch the endpoint to "
            "v2024-01-01 in Voucherify's Project settings"
        )
    if delivery.envelope.event_id is None:
        return "no event.id and no envelope id: the event cannot be deduplicated"
    if not delivery.envelope.type:
        return "no event.type and no type"
    return None


def _finish(
    conn: psycopg.Connection[Any],
    params: dict[str, Any],
    status: EventStatus,
    error: str | None = None,
) -> None:
    """The event's final status and its delivery's outcome (the same word)."""
    conn.execute(
        FINISH_EVENT,
        {
            **params,
            "status": status,
            "settled": status in SETTLED,
            "error": error,
            "outcome": DeliveryOutcome(status),
        },
    )


def record_failure(
    pool: ConnectionPool, body: str, delivery_id: str, received_at: str, error: str
) -> bool:
    """Best effort, never raising: mark the event ``failed`` with its error (an event
    already final is left alone, the delivery recorded as a duplicate). False when even
    that could not be written: the caller parks the delivery."""
    try:
        delivery = read_delivery(body, delivery_id, received_at)
        words = {
            "error": _UNSTORABLE.sub("\ufffd", error)[:2000],
            "status": EventStatus.FAILED,
            "outcome": DeliveryOutcome.FAILED,
            "duplicate": DeliveryOutcome.DUPLICATE,
            "unfinished": list(UNFINISHED_STATUSES),
        }
        with pool.connection(timeout=2) as conn, conn.transaction():
            _execute_with_body(conn, delivery, RECORD_FAILURE, words)
    except Exception as exc:  # noqa: BLE001 - the edge of recording: the caller parks
        log.warning("event.failure_not_recorded", extra={"error": describe(exc)})
        return False
    return True
