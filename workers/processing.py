"""Apply one delivery: record it in the inbox and, unless its event was seen, apply the event.

Everything for one delivery happens in one transaction: the inbox row of the event is
claimed (inserted, or locked when it exists: a concurrent duplicate waits here), the
handler's effects are written, and the event's final status and the delivery row are
written last. They commit together or not at all.

Outcomes: ``processed``; ``duplicate`` (the event was already applied, ignored or dead:
the delivery is recorded, nothing is applied); ``ignored`` (no handler for the type);
``dead`` (the payload failed validation: a dead-letter row with the reason, no retry).
Transient faults raise ``TransientError`` after the transaction rolled back; the task
decides when to retry.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from marshmallow import ValidationError
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from schemas.envelope import LEGACY_FORMAT, Envelope, read_envelope
from schemas.vocabulary import FINAL_STATUSES, UNFINISHED_STATUSES, DeliveryOutcome, EventStatus
from workers import handlers  # noqa: F401 - importing registers the handlers
from workers.registry import Registry, registry

log = logging.getLogger(__name__)

SETTLED = (EventStatus.PROCESSED, EventStatus.IGNORED)
"""Final statuses that stamp ``processed_at``: the event was applied or had nothing to apply."""

# psycopg_pool.PoolTimeout, SerializationFailure and DeadlockDetected are all
# OperationalErrors: the database is unreachable, busy, or asked us to try again.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (psycopg.OperationalError,)

CLAIM_EVENT = """
INSERT INTO events AS e (event_id, type, payload, event_created_at, received_at)
VALUES (%(event_id)s, %(type)s, %(payload)s::jsonb, %(event_created_at)s, %(received_at)s)
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

RECORD_FAILURE = """
WITH failed AS (
    INSERT INTO events AS e (event_id, type, payload, event_created_at, received_at,
                             status, attempts, last_error)
    VALUES (%(event_id)s, %(type)s, %(payload)s::jsonb, %(event_created_at)s, %(received_at)s,
            %(status)s, 1, %(error)s)
    ON CONFLICT (event_id) DO UPDATE
    SET status = %(status)s, attempts = e.attempts + 1, last_error = EXCLUDED.last_error,
        updated_at = now()
    WHERE e.status = ANY(%(unfinished)s)
)
INSERT INTO deliveries (delivery_id, event_id, received_at, outcome)
VALUES (%(delivery_id)s, %(event_id)s, %(received_at)s, %(outcome)s)
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
    received_at: str
    body: str
    document: dict[str, Any] | None
    envelope: Envelope | None

    @property
    def event_id(self) -> str:
        if self.envelope and self.envelope.event_id:
            return self.envelope.event_id
        return f"delivery:{self.delivery_id}"

    @property
    def type(self) -> str:
        return self.envelope.type if self.envelope else ""

    def inbox_params(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "type": self.type,
            "payload": self.body if self.document is not None else None,
            "event_created_at": _parse_time(
                self.envelope.event_created_at if self.envelope else None
            ),
            "received_at": self.received_at,
            "delivery_id": self.delivery_id,
        }


def read_delivery(body: str, delivery_id: str, received_at: str) -> Delivery:
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        return Delivery(delivery_id, received_at, body, None, None)
    return Delivery(delivery_id, received_at, body, document, read_envelope(document))


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def process_delivery(
    pool: ConnectionPool,
    body: str,
    delivery_id: str,
    received_at: str,
    routes: Registry = registry,
) -> Outcome:
    delivery = read_delivery(body, delivery_id, received_at)
    try:
        try:
            # Pipeline mode: statements go out without waiting for each answer; only the
            # claim is waited for. One delivery costs two round trips, not ten.
            with pool.connection() as conn, conn.pipeline(), conn.transaction():
                return _apply(conn, delivery, routes)
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            # Values the schemas let through but PostgreSQL refuses (a NUL character, say):
            # permanent. The failed transaction is gone; dead-letter in a fresh one.
            reason = f"rejected by the database: {type(exc).__name__}: {exc}"
            with pool.connection() as conn, conn.transaction():
                return _dead_letter(conn, delivery, reason)
    except TRANSIENT_ERRORS as exc:
        raise TransientError(f"{type(exc).__name__}: {exc}") from exc


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
    params = {**delivery.inbox_params(), "event_id": _safe_text(delivery.event_id)}
    params["type"] = _safe_text(params["type"])
    try:
        with conn.transaction():
            conn.execute(CLAIM_EVENT, params)
    except psycopg.DataError:
        params["payload"] = None  # the body itself cannot be stored as jsonb
        conn.execute(CLAIM_EVENT, params)
    _finish(conn, params, EventStatus.DEAD, error=reason)
    conn.execute(INSERT_DEAD_LETTER, {**params, "reason": reason})
    return Outcome(DeliveryOutcome.DEAD, params["event_id"], params["type"], reason)


def _safe_text(text: str) -> str:
    return text.replace("\x00", "")


def _unusable(delivery: Delivery) -> str | None:
    """Why a delivery can never be applied, before looking at its type; None when it can."""
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
    """Best effort: mark the event ``failed`` with its error. False when even that failed."""
    delivery = read_delivery(body, delivery_id, received_at)
    try:
        with pool.connection(timeout=2) as conn, conn.transaction():
            conn.execute(
                RECORD_FAILURE,
                {
                    **delivery.inbox_params(),
                    "error": error[:2000],
                    "status": EventStatus.FAILED,
                    "outcome": DeliveryOutcome.FAILED,
                    "unfinished": list(UNFINISHED_STATUSES),
                },
            )
    except psycopg.Error as exc:
        log.warning("event.failure_not_recorded", extra={"error": repr(exc)})
        return False
    return True
