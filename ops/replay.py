"""Send stored events back to the workers: a dead letter, one event, or a received-at range.

A replay sets the event back to ``received`` (so the worker applies it again instead of
recording a duplicate), marks its open dead letters replayed, and LPUSHes a new delivery
of the stored payload to the ``deliveries`` list, all before the transaction commits:
the event's row stays locked until then, so a worker that takes the message first waits
for the commit, and a Redis failure rolls the database change back (nothing half done).
The handlers are idempotent (unique keys, forward-only transitions), so replaying an
event that was already applied changes nothing it should not.

An event whose payload was pruned by retention cannot be replayed (``PayloadPruned``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from ops import queries
from ops.context import OpsContext
from workers.messages import DELIVERY_QUEUE, delivery_message

log = logging.getLogger(__name__)

REPLAY_BATCH = 200


class NotFound(LookupError):
    pass


class PayloadPruned(RuntimeError):
    """The event's payload is gone (retention): there is nothing to replay."""


class BrokerUnavailable(RuntimeError):
    """Redis did not take the message; nothing was changed."""


@dataclass(frozen=True, slots=True)
class ReplayStep:
    """One row of a replay: what happened (or, in a dry run, what would)."""

    event_id: str
    type: str
    status_before: str
    action: str  # "requeued", "would_requeue", "skipped_payload_pruned"
    delivery_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "type": self.type,
            "status_before": self.status_before,
            "status_after": "received" if self.action in ("requeued", "would_requeue") else None,
            "action": self.action,
            "delivery_id": self.delivery_id,
        }


def _push(context: OpsContext, payload: str) -> str:
    delivery_id = f"replay-{uuid.uuid4().hex}"
    message = delivery_message(payload, delivery_id, datetime.now(UTC).isoformat())
    try:
        context.redis().lpush(DELIVERY_QUEUE, message)
    except redis.RedisError as exc:
        raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc
    return delivery_id


def _requeue(context: OpsContext, conn: queries.Conn, event_id: str) -> ReplayStep:
    row = queries.requeue_event(conn, event_id)
    if row is None:
        raise PayloadPruned(event_id)
    delivery_id = _push(context, row["payload"])
    log.info(
        "ops.event_requeued",
        extra={
            "event_id": event_id,
            "type": row["type"],
            "delivery_id": delivery_id,
            "status_before": row["previous_status"],
        },
    )
    return ReplayStep(event_id, row["type"], row["previous_status"], "requeued", delivery_id)


def replay_dead_letter(context: OpsContext, dead_letter_id: int) -> ReplayStep:
    with context.transaction() as conn:
        letter = queries.dead_letter(conn, dead_letter_id)
        if letter is None:
            raise NotFound(dead_letter_id)
        if not letter["has_payload"]:
            raise PayloadPruned(letter["event_id"])
        return _requeue(context, conn, letter["event_id"])


def replay_event(context: OpsContext, event_id: str, dry_run: bool = False) -> ReplayStep:
    with context.transaction() as conn:
        current = queries.event(conn, event_id)
        if current is None:
            raise NotFound(event_id)
        if not current["has_payload"]:
            if dry_run:
                return ReplayStep(
                    event_id, current["type"], current["status"], "skipped_payload_pruned"
                )
            raise PayloadPruned(event_id)
        if dry_run:
            return ReplayStep(event_id, current["type"], current["status"], "would_requeue")
        return _requeue(context, conn, event_id)


def replay_range(
    context: OpsContext,
    since: datetime,
    until: datetime | None,
    statuses: list[str] | None,
    dry_run: bool = False,
    max_events: int = 10_000,
) -> Iterator[ReplayStep]:
    """Every event received in [since, until) with one of ``statuses`` (None: any), oldest
    first, one transaction per event; at most ``max_events``. Yields a step per event."""
    after: tuple[datetime, str] | None = None
    done = 0
    while done < max_events:
        with context.transaction() as conn:
            batch = queries.events_to_replay(
                conn,
                since=since,
                until=until,
                statuses=statuses,
                after=after,
                limit=min(REPLAY_BATCH, max_events - done),
            )
        if not batch:
            return
        for row in batch:
            after = (row["received_at"], row["event_id"])
            done += 1
            if not row["has_payload"]:
                yield ReplayStep(
                    row["event_id"], row["type"], row["status"], "skipped_payload_pruned"
                )
            elif dry_run:
                yield ReplayStep(row["event_id"], row["type"], row["status"], "would_requeue")
            else:
                try:
                    yield replay_event(context, row["event_id"])
                except (PayloadPruned, NotFound):  # pruned or deleted since the batch was read
                    yield ReplayStep(
                        row["event_id"], row["type"], row["status"], "skipped_payload_pruned"
                    )
