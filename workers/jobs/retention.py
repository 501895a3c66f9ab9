"""Retention: delete what is old and settled, keep what deduplication and people need.

Three horizons, each applied in bounded batches (``FOR UPDATE SKIP LOCKED``) until done or
out of time; what is left waits for the next run:

- deliveries whose ``received_at`` is older than ``RETENTION_DAYS`` (default 30), and
- raw bodies (``events.payload``, or ``events.raw_body`` when jsonb refused it; they
  carry customers' personal data) of events
  received before then, are deleted -- only for settled events: ``processed``,
  ``ignored``, or ``dead`` with every dead letter replayed;
- event rows (the event id, type, status and dates: what deduplication needs) are deleted
  ``RETENTION_EVENT_IDS_DAYS`` (default 90, never less than ``RETENTION_DAYS`` nor 15) after
  the event was last seen (``updated_at`` moves with every delivery of it), so a late
  re-send -- Voucherify retries for up to about 2.5 days, and re-sends by hand from its
  audit log for up to 14 -- is still recognised as a duplicate.

Never touched, whatever their age: events still ``received`` or ``failed`` (the re-drive
job's work), and dead events with a dead letter not replayed yet (its body is what a
replay needs). Job runs older than ``RETENTION_DAYS`` go too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from psycopg import sql
from psycopg_pool import ConnectionPool

from schemas.vocabulary import EventStatus, JobOutcome
from workers.jobs.result import JobResult

log = logging.getLogger(__name__)

Query = sql.SQL | sql.Composed

BATCH_SIZE = 1000
MIN_EVENT_ID_DAYS = 15

# What "settled" means, once, composed into the three statements on events below.
SETTLED = sql.SQL("""(
    e.status IN (%(processed)s, %(ignored)s)
    OR (e.status = %(dead)s AND NOT EXISTS (
        SELECT 1 FROM dead_letters dl WHERE dl.event_id = e.event_id AND dl.replayed_at IS NULL))
)""")

DELETE_DELIVERIES = sql.SQL("""
DELETE FROM deliveries WHERE delivery_id IN (
    SELECT d.delivery_id FROM deliveries d JOIN events e USING (event_id)
    WHERE d.received_at < now() - make_interval(days => %(days)s) AND {settled}
    LIMIT %(batch)s
    FOR UPDATE OF d SKIP LOCKED
)
""").format(settled=SETTLED)

DELETE_EVENTS = sql.SQL("""
DELETE FROM events WHERE event_id IN (
    SELECT e.event_id FROM events e
    WHERE e.updated_at < now() - make_interval(days => %(days)s)
      AND e.received_at < now() - make_interval(days => %(days)s)
      AND {settled}
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
""").format(settled=SETTLED)

PRUNE_BODIES = sql.SQL("""
UPDATE events SET payload = NULL, raw_body = NULL WHERE event_id IN (
    SELECT e.event_id FROM events e
    WHERE (e.payload IS NOT NULL OR e.raw_body IS NOT NULL)
      AND e.received_at < now() - make_interval(days => %(days)s)
      AND {settled}
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
""").format(settled=SETTLED)

DELETE_JOB_RUNS = sql.SQL("""
DELETE FROM job_runs WHERE id IN (
    SELECT id FROM job_runs
    WHERE started_at < now() - make_interval(days => %(days)s) AND outcome <> %(running)s
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
""")

WORDS: dict[str, Any] = {
    "processed": EventStatus.PROCESSED,
    "ignored": EventStatus.IGNORED,
    "dead": EventStatus.DEAD,
    "running": JobOutcome.RUNNING,
}
"""The vocabulary the statements above take as parameters (each ignores what it lacks)."""


@dataclass(frozen=True, slots=True)
class RetentionResult(JobResult):
    deliveries_deleted: int = 0
    bodies_pruned: int = 0
    events_deleted: int = 0
    job_runs_deleted: int = 0
    complete: int = 1  # 0 when the time budget ran out first


def apply_retention(
    pool: ConnectionPool,
    retention_days: int,
    event_ids_days: int,
    deadline: float,
    batch_size: int = BATCH_SIZE,
) -> RetentionResult:
    id_days = max(event_ids_days, retention_days, MIN_EVENT_ID_DAYS)
    counts: dict[str, int] = {}
    complete = True
    # Deliveries first: the event rows deleted next would take theirs along (ON DELETE
    # CASCADE) in one big statement; and events before bodies, so no body is rewritten
    # just before its row goes.
    steps: tuple[tuple[str, Query, int], ...] = (
        ("deliveries_deleted", DELETE_DELIVERIES, retention_days),
        ("events_deleted", DELETE_EVENTS, id_days),
        ("bodies_pruned", PRUNE_BODIES, retention_days),
        ("job_runs_deleted", DELETE_JOB_RUNS, retention_days),
    )
    for name, query, days in steps:
        counts[name], done = _in_batches(pool, query, days, batch_size, deadline)
        complete = complete and done
    result = RetentionResult(**counts, complete=int(complete))
    log.info("retention.done", extra=result.as_dict())
    return result


def _in_batches(
    pool: ConnectionPool, query: Query, days: int, batch_size: int, deadline: float
) -> tuple[int, bool]:
    total = 0
    params = {**WORDS, "days": days, "batch": batch_size}
    while time.monotonic() < deadline:
        with pool.connection() as conn, conn.transaction():
            n = conn.execute(query, params).rowcount
        total += n
        if n < batch_size:
            return total, True
    return total, False
