"""Apply deliveries: record each in the inbox and, unless its event was seen, apply the event.

A batch of deliveries is one transaction (``process_batch``): applied in one pass, and
if a statement fails, rolled back and applied again with each delivery in its own
savepoint; ``process_delivery`` is a batch of one. For each delivery the inbox row of the
event is claimed (inserted, or locked when it exists: a concurrent duplicate waits here),
the handler's effects are written, and the event's final status and the delivery row are
written last: they commit together, with the batch, or not at all.

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

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import psycopg
from billiard.exceptions import SoftTimeLimitExceeded
from marshmallow import ValidationError
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from schemas.envelope import LEGACY_FORMAT
from schemas.vocabulary import FINAL_STATUSES, UNFINISHED_STATUSES, DeliveryOutcome, EventStatus
from workers import handlers  # noqa: F401 - importing registers the handlers
from workers.delivery import BodyForm, Delivery, read_delivery, storable_text
from workers.faults import (
    STORAGE_ERRORS,
    TRANSIENT_ERRORS,
    TransientError,
    describe,
    refusal,
)
from workers.inbox_sql import (
    CLAIM_EVENT,
    FINISH_EVENT,
    INSERT_DEAD_LETTER,
    RECORD_DUPLICATE,
    RECORD_FAILURE,
)
from workers.registry import Registry, registry

log = logging.getLogger(__name__)

SETTLED = (EventStatus.PROCESSED, EventStatus.IGNORED)
"""Final statuses that stamp ``processed_at``: the event was applied or had nothing to apply."""


BATCH_LOCK_TIMEOUT = "SET LOCAL lock_timeout = '200ms'"
"""A batch holds the rows it wrote until its commit, so two batches touching the same
card (a redemption in one, its rollback in the other) wait on each other, and in turn
deadlock (found by PostgreSQL only after ``deadlock_timeout``, 1 s). Waiting at most
200 ms, a delivery whose row another batch holds is a transient fault of its own: its
savepoint rolls back and it goes to the single-delivery task, which waits as long as it
needs. A batch of one keeps PostgreSQL's default (wait)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    status: DeliveryOutcome
    event_id: str
    type: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Deferred:
    """A delivery of a batch that was neither applied nor recorded: its savepoint rolled
    back. ``transient``: the database could not take it now (a deadlock, a lock or
    statement timeout), the task hands it to the single-delivery task; else a bug
    (``error`` is the exception), the task records it ``failed`` for the re-drive job."""

    delivery: Delivery
    error: BaseException
    transient: bool


Result = Outcome | Deferred


def process_delivery(
    pool: ConnectionPool,
    body: str,
    delivery_id: str,
    received_at: str,
    routes: Registry = registry,
) -> Outcome:
    """Apply one delivery (replay, re-drive, verify and drift healing call this): the batch
    path with a batch of one. A transient fault raises ``TransientError``; a bug raises
    as it came."""
    [result] = process_batch(pool, [(body, delivery_id, received_at)], routes)
    if isinstance(result, Deferred):
        if result.transient:
            raise TransientError(describe(result.error)) from result.error
        raise result.error
    return result


def process_batch(
    pool: ConnectionPool,
    messages: Sequence[tuple[str, str, str]],
    routes: Registry = registry,
) -> list[Result]:
    """Apply deliveries ``(body, delivery_id, received_at)`` in one transaction, one commit:
    in one pass (``_apply_together``), or, once a statement failed, each in its own
    savepoint, so that a dead letter, a handler error or a deadlock rolls back that
    delivery alone. The results are in the order of ``messages``.

    A duplicate inside the batch finds the event its earlier twin claimed (same
    transaction) final: recorded as a duplicate. One in another worker's batch waits on
    the claim's row lock until that batch commits, then finds it final too.

    Raises ``TransientError`` when the transaction as a whole failed (PostgreSQL gone,
    the connection lost, the commit refused): nothing of the batch is applied.
    """
    deliveries = [read_delivery(*message) for message in messages]
    try:
        with pool.connection() as conn:
            storable_text(conn)
            if all(_plain(d) for d in deliveries):
                together = _apply_together(conn, deliveries, routes)
                if together is not None:
                    return together
            # Pipeline mode: statements go out without waiting for each answer; each
            # delivery waits for its claim and for one sync at the end of its savepoint.
            # Nothing is prepared in this pass (see ``_unprepared``).
            with _unprepared(conn), conn.pipeline() as pipe, conn.transaction():
                if len(deliveries) > 1:
                    conn.execute(BATCH_LOCK_TIMEOUT)
                return [_apply_isolated(conn, pipe, d, routes) for d in deliveries]
    except TRANSIENT_ERRORS as exc:
        raise TransientError(describe(exc)) from exc


def _plain(delivery: Delivery) -> bool:
    """Whether a delivery can go in a batch without savepoints: storable, its body kept as
    jsonb at the first try (what else it may need is a savepoint's business)."""
    return delivery.refused is None and delivery.jsonb


def _apply_together(
    conn: psycopg.Connection[Any], deliveries: Sequence[Delivery], routes: Registry
) -> list[Result] | None:
    """The batch applied in one transaction without a savepoint per delivery: two
    statements and one round trip fewer per delivery, for the batches where nothing fails
    (nearly all). None when a statement failed: the transaction rolled back (psycopg's own
    rollback forgets its prepared names), and the batch is applied again, each delivery in
    its savepoint, so that the one that failed is rolled back alone. A batch of one too:
    a delivery that fails has its own savepoint only on its second pass. Raises when the
    connection is lost or the soft time limit came: the batch as a whole is then the
    caller's business."""
    try:
        with conn.pipeline(), conn.transaction():
            if len(deliveries) > 1:
                conn.execute(BATCH_LOCK_TIMEOUT)
            return [_apply(conn, d, routes, "jsonb") for d in deliveries]
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:
        if _connection_lost(conn):
            raise  # the whole batch is transient
        log.info("batch.isolating", extra={"size": len(deliveries), "error": describe(exc)})
        return None


def _apply_isolated(
    conn: psycopg.Connection[Any], pipe: psycopg.Pipeline, delivery: Delivery, routes: Registry
) -> Result:
    """One delivery of a batch, in savepoints: applied with the body as jsonb, else -- a
    \\u0000 escape or a lone surrogate that jsonb refuses, valid JSON all the same -- as
    text; refused that way too, a dead letter. Raises only when the connection itself
    is lost (the whole batch is then transient)."""
    reason = delivery.refused
    try:
        for form in delivery.kept_forms() if reason is None else []:
            try:
                with _savepoint(conn, pipe):
                    return _apply(conn, delivery, routes, form)
            except STORAGE_ERRORS as exc:
                reason = refusal(exc)
                if reason is None:
                    raise
        if reason is None:  # no form keeps it: not JSON, and NUL in it (text refuses it)
            reason = _unusable(delivery) or "not storable: the body holds a NUL character"
        with _savepoint(conn, pipe):
            return _dead_letter(conn, delivery, reason)
    except Exception as exc:
        if _connection_lost(conn):
            raise  # the whole batch is transient
        return Deferred(delivery, exc, transient=isinstance(exc, TRANSIENT_ERRORS))


def _connection_lost(conn: psycopg.Connection[Any]) -> bool:
    return conn.closed or conn.pgconn.status != psycopg.pq.ConnStatus.OK


def record_dead_letter(
    pool: ConnectionPool, body: str, delivery_id: str, received_at: str, reason: str
) -> Outcome:
    """Dead-letter a delivery for a reason of the caller's (its worker process died on it
    too often), its event kept with its body; a duplicate when its event is already final.
    Raises ``TransientError`` when PostgreSQL cannot be reached."""
    delivery = read_delivery(body, delivery_id, received_at)
    try:
        with pool.connection() as conn, conn.transaction():
            return _dead_letter(conn, delivery, reason)
    except TRANSIENT_ERRORS as exc:
        raise TransientError(describe(exc)) from exc


@contextmanager
def _savepoint(conn: psycopg.Connection[Any], pipe: psycopg.Pipeline) -> Iterator[None]:
    """A savepoint around one delivery, in pipeline mode, with one sync at its end: the
    delivery's errors surface there, inside it, and roll back only what it wrote.

    Not psycopg's nested ``conn.transaction()``: in pipeline mode that wraps itself in
    two nested pipelines, whose exits sync, three round trips per delivery instead of one.
    """
    conn.execute("SAVEPOINT delivery")
    try:
        yield
        conn.execute("RELEASE SAVEPOINT delivery")
        pipe.sync()
    except BaseException:
        # Out of the aborted-pipeline state first (statements after an error are skipped
        # until a sync), then back to the savepoint.
        with suppress(psycopg.Error):
            pipe.sync()
        conn.execute("ROLLBACK TO SAVEPOINT delivery")
        conn.execute("RELEASE SAVEPOINT delivery")
        pipe.sync()
        raise


@contextmanager
def _unprepared(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """No statement prepared, nor run by a prepared name, while inside (psycopg's public
    ``prepare_threshold``, None), for the savepoint pass.

    Why: psycopg records a statement as prepared when it *sends* its ``Parse``. After a
    statement fails in pipeline mode, PostgreSQL skips every message until the next sync;
    a statement reaching its threshold in that stretch would be recorded prepared though
    its ``Parse`` never ran, and its next run would name a statement the server lacks
    (``InvalidSqlStatementName``, seen in bench.load on 2026-12-02). This pass runs only
    after a failure, so it costs nothing that matters; the one-pass batches prepare as
    the pool says."""
    threshold = conn.prepare_threshold
    conn.prepare_threshold = None
    try:
        yield
    finally:
        conn.prepare_threshold = threshold


def _apply(
    conn: psycopg.Connection[Any], delivery: Delivery, routes: Registry, form: BodyForm
) -> Outcome:
    params = delivery.inbox_params(form)
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
            "error": error[:2000],  # NUL and lone surrogates: storable_text below
            "status": EventStatus.FAILED,
            "outcome": DeliveryOutcome.FAILED,
            "duplicate": DeliveryOutcome.DUPLICATE,
            "unfinished": list(UNFINISHED_STATUSES),
        }
        with pool.connection(timeout=2) as conn, conn.transaction():
            _execute_with_body(storable_text(conn), delivery, RECORD_FAILURE, words)
    except Exception as exc:  # noqa: BLE001 - the edge of recording: the caller parks
        log.warning("event.failure_not_recorded", extra={"error": describe(exc)})
        return False
    return True
