"""What the ops API, the dashboard and the CLI ask of the pipeline, answered once.

Each front-end parses what it was given (a ``params.Query``: a query string, a form, the
CLI's options) into a frozen filter below, calls a function here (each runs its own
transaction) and renders the answer; an unknown id raises ``NotFound``, a bad parameter
``ParamError``.

A replay sets the event back to ``received`` (the worker applies it again instead of
recording a duplicate), marks its dead letters replayed and pushes a new delivery of the
stored payload (``workers.queue.requeue``) before the commit: the row stays locked until
then, and a Redis failure (``BrokerUnavailable``) rolls it all back. The handlers are
idempotent, so replaying an applied event changes nothing it should not. A pruned payload
cannot be replayed (``PayloadPruned``); a dry run changes nothing and says what would be.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from ops import store
from ops.context import OpsContext
from ops.params import (
    DEFAULT_LIMIT,
    ParamError,
    Query,
    decode_event_cursor,
    encode_event_cursor,
    every,
    first,
    parse_bool,
    parse_choice,
    parse_id,
    parse_limit,
    parse_note,
    parse_statuses,
    parse_time,
)
from ops.store import EventCursor, Page, Row
from schemas.vocabulary import ActionKind, EventStatus, FlagCategory, FlagStatus
from workers import queue
from workers.queue import BrokerUnavailable as BrokerUnavailable  # raised by a replay

log = logging.getLogger(__name__)

ATTENTION_STATUSES = (EventStatus.FAILED, EventStatus.DEAD)
"""What "what failed" means: the overview's list and a replay range's default."""
REPLAY_BATCH = 200
MAX_REPLAY_EVENTS = 10_000


class NotFound(LookupError):
    """No ``what`` (an event, a flag, a dead letter...) has the id ``ident``."""

    def __init__(self, what: str, ident: object) -> None:
        super().__init__(f"{what} {ident}")
        self.what = what
        self.ident = str(ident)


class PayloadPruned(RuntimeError):
    """The event's payload is gone (retention): there is nothing to replay."""


# --- filters ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventFilter:
    statuses: tuple[EventStatus, ...] | None = None  # None: any
    type: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    cursor: EventCursor | None = None
    limit: int = DEFAULT_LIMIT

    @classmethod
    def parse(cls, query: Query) -> EventFilter:
        return cls(
            statuses=parse_statuses(every(query, "status")),
            type=first(query, "type"),
            since=parse_time("since", first(query, "since")),
            until=parse_time("until", first(query, "until")),
            cursor=decode_event_cursor(first(query, "cursor")),
            limit=parse_limit(first(query, "limit")),
        )


@dataclass(frozen=True, slots=True)
class FlagFilter:
    status: FlagStatus | None = None
    category: FlagCategory | None = None
    failure_code: str | None = None
    redemption_id: str | None = None
    cursor: int | None = None
    limit: int = DEFAULT_LIMIT

    @classmethod
    def parse(cls, query: Query) -> FlagFilter:
        return cls(
            status=parse_choice("status", first(query, "status"), FlagStatus),
            category=parse_choice("category", first(query, "category"), FlagCategory),
            failure_code=first(query, "failure_code") or first(query, "code"),
            redemption_id=first(query, "redemption_id"),
            cursor=parse_id("cursor", first(query, "cursor")),
            limit=parse_limit(first(query, "limit")),
        )


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    type: str | None = None
    replayed: bool | None = None  # None: either
    cursor: int | None = None
    limit: int = DEFAULT_LIMIT

    @classmethod
    def parse(cls, query: Query) -> DeadLetterFilter:
        return cls(
            type=first(query, "type"),
            replayed=parse_bool("replayed", first(query, "replayed")),
            cursor=parse_id("cursor", first(query, "cursor")),
            limit=parse_limit(first(query, "limit")),
        )


@dataclass(frozen=True, slots=True)
class Paging:
    """A page of a list keyed by id (a customer's ledger)."""

    cursor: int | None = None
    limit: int = DEFAULT_LIMIT

    @classmethod
    def parse(cls, query: Query) -> Paging:
        return cls(parse_id("cursor", first(query, "cursor")), parse_limit(first(query, "limit")))


@dataclass(frozen=True, slots=True)
class ReplayRange:
    """Events received in [since, until) with one of ``statuses`` (None: any)."""

    since: datetime
    until: datetime | None = None
    statuses: tuple[EventStatus, ...] | None = ATTENTION_STATUSES

    @classmethod
    def parse(cls, query: Query) -> ReplayRange:
        since = parse_time("since", first(query, "since"))
        if since is None:
            raise ParamError("since", "give the start of the range")
        given = every(query, "status")
        statuses = parse_statuses(given) if given else ATTENTION_STATUSES
        return cls(since, parse_time("until", first(query, "until")), statuses)


# --- reads ------------------------------------------------------------------------------


def _found(what: str, ident: object, row: Row | None) -> Row:
    if row is None:
        raise NotFound(what, ident)
    return row


def event(context: OpsContext, event_id: str) -> Row:
    with context.transaction() as conn:
        return _found("event", event_id, store.event(conn, event_id))


def events(context: OpsContext, wanted: EventFilter) -> Page:
    """Newest first; ``next_cursor`` is an opaque string."""
    with context.transaction() as conn:
        found = store.events(
            conn,
            statuses=wanted.statuses,
            event_type=wanted.type,
            since=wanted.since,
            until=wanted.until,
            cursor=wanted.cursor,
            limit=wanted.limit,
        )
    return Page(found.items, encode_event_cursor(found.next_cursor))


def order(context: OpsContext, order_id: str) -> Row:
    with context.transaction() as conn:
        return _found("order", order_id, store.order(conn, order_id))


def redemption(context: OpsContext, redemption_id: str) -> Row:
    with context.transaction() as conn:
        return _found("redemption", redemption_id, store.redemption(conn, redemption_id))


def customer(context: OpsContext, customer_id: str) -> Row:
    with context.transaction() as conn:
        return _found("customer", customer_id, store.customer(conn, customer_id))


def ledger(context: OpsContext, customer_id: str, paging: Paging) -> Row:
    with context.transaction() as conn:
        if not store.customer_known(conn, customer_id):
            raise NotFound("customer", customer_id)
        return store.ledger(conn, customer_id, cursor=paging.cursor, limit=paging.limit)


def flags(context: OpsContext, wanted: FlagFilter) -> Page:
    with context.transaction() as conn:
        return store.flags(
            conn,
            status=wanted.status,
            failure_code=wanted.failure_code,
            category=wanted.category,
            redemption_id=wanted.redemption_id,
            cursor=wanted.cursor,
            limit=wanted.limit,
        )


def flag(context: OpsContext, flag_id: int) -> Row:
    with context.transaction() as conn:
        return _found("flag", flag_id, store.flag(conn, flag_id))


def resolve_flag(context: OpsContext, flag_id: int, note: object = None) -> Row:
    """Resolve an open flag with ``note``; resolving again changes nothing."""
    checked = parse_note(note)
    with context.transaction() as conn:
        row = _found("flag", flag_id, store.resolve_flag(conn, flag_id, checked))
    log.info("ops.flag_resolved", extra={"flag_id": flag_id})
    return row


ACTION_SECONDS = 30.0
"""The most a flag's action may take (its few calls, each waiting a few seconds at most)."""
MAX_BY_CHARS = 200


def flag_action(context: OpsContext, flag_id: int, body: dict[str, Any], by: str) -> Row:
    """Preview (``confirm`` false) or do (true) an action on a flag through Voucherify's API
    (``workers.jobs.flag_actions``): ``ActionRefused`` says why not, with its HTTP status."""
    from workers.jobs import flag_actions  # the workers' apply path: loaded when acting

    kind = body.get("kind")
    if not isinstance(kind, str) or kind not in set(ActionKind):
        choices = ", ".join(ActionKind)
        raise ParamError("kind", f"expected one of {choices}")
    confirm = body.get("confirm", False)
    if not isinstance(confirm, bool):
        raise ParamError("confirm", "expected true or false")
    asked_by = body.get("by", by)
    if not isinstance(asked_by, str) or not asked_by.strip() or len(asked_by) > MAX_BY_CHARS:
        raise ParamError("by", f"a name of 1 to {MAX_BY_CHARS} characters")
    with context.pool() as pool:
        api = context.voucherify_api(pool)
        if api is None:
            raise flag_actions.ActionRefused(
                409,
                "voucherify_api_not_configured",
                "acting on a flag calls Voucherify's API: set VOUCHERIFY_API_URL, "
                "VOUCHERIFY_APP_ID and VOUCHERIFY_APP_TOKEN",
            )
        deadline = time.monotonic() + ACTION_SECONDS
        if not confirm:
            return flag_actions.preview(pool, api, flag_id, kind, deadline)
        return flag_actions.act(pool, api, flag_id, kind, asked_by.strip(), deadline)


def dead_letters(context: OpsContext, wanted: DeadLetterFilter) -> Page:
    with context.transaction() as conn:
        return store.dead_letters(
            conn,
            event_type=wanted.type,
            replayed=wanted.replayed,
            cursor=wanted.cursor,
            limit=wanted.limit,
        )


def dead_letter(context: OpsContext, dead_letter_id: int) -> Row:
    with context.transaction() as conn:
        return _found("dead letter", dead_letter_id, store.dead_letter(conn, dead_letter_id))


def search(context: OpsContext, text: str | None) -> Row:
    """Everything whose id is ``text`` (exact): ``events``, ``redemptions``, ``orders``,
    ``customers``."""
    text = (text or "").strip()
    if not text:
        raise ParamError("q", "give an event, delivery, order, redemption or customer id")
    with context.transaction() as conn:
        return store.search(conn, text)


# --- replay -----------------------------------------------------------------------------


class ReplayAction(StrEnum):
    REQUEUED = "requeued"
    WOULD_REQUEUE = "would_requeue"  # a dry run
    SKIPPED_PAYLOAD_PRUNED = "skipped_payload_pruned"
    NOT_FOUND = "not_found"  # an id of a list that is no event


@dataclass(frozen=True, slots=True)
class ReplayStep:
    """One row of a replay: what happened (or, in a dry run, what would)."""

    event_id: str
    type: str | None
    status_before: str | None
    action: ReplayAction
    delivery_id: str | None = None

    @property
    def requeues(self) -> bool:
        """The event goes (or, in a dry run, would go) back to received."""
        return self.action in (ReplayAction.REQUEUED, ReplayAction.WOULD_REQUEUE)

    def as_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "type": self.type,
            "status_before": self.status_before,
            "status_after": EventStatus.RECEIVED if self.requeues else None,
            "action": self.action,
            "delivery_id": self.delivery_id,
        }


def _requeue(context: OpsContext, conn: store.Conn, event_id: str) -> ReplayStep:
    row = store.requeue_event(conn, event_id)
    if row is None:
        raise PayloadPruned(event_id)
    delivery_id = f"replay-{uuid.uuid4().hex}"
    message = queue.Message(row["payload"], delivery_id, datetime.now(UTC).isoformat())
    queue.requeue(context.redis(), [message])  # BrokerUnavailable: the transaction rolls back
    step = ReplayStep(
        event_id, row["type"], row["previous_status"], ReplayAction.REQUEUED, delivery_id
    )
    log.info("ops.event_requeued", extra=step.as_dict())
    return step


def _replay(
    context: OpsContext, conn: store.Conn, event_id: str, dry_run: bool, skip_pruned: bool
) -> ReplayStep:
    current = _found("event", event_id, store.event(conn, event_id))
    step = ReplayStep(
        event_id, current["type"], current["status"], ReplayAction.SKIPPED_PAYLOAD_PRUNED
    )
    if not current["has_payload"]:
        if dry_run or skip_pruned:
            return step
        raise PayloadPruned(event_id)
    if dry_run:
        return replace(step, action=ReplayAction.WOULD_REQUEUE)
    return _requeue(context, conn, event_id)


def replay_dead_letter(
    context: OpsContext, dead_letter_id: int, dry_run: bool = False
) -> ReplayStep:
    with context.transaction() as conn:
        letter = _found("dead letter", dead_letter_id, store.dead_letter(conn, dead_letter_id))
        return _replay(context, conn, letter["event_id"], dry_run, skip_pruned=False)


def replay_event(
    context: OpsContext, event_id: str, dry_run: bool = False, skip_pruned: bool = False
) -> ReplayStep:
    """Replay one event; a pruned payload raises ``PayloadPruned``, unless this is a dry run
    or ``skip_pruned`` (then the step says it was skipped)."""
    with context.transaction() as conn:
        return _replay(context, conn, event_id, dry_run, skip_pruned)


def replay_events(
    context: OpsContext, event_ids: Iterable[str], dry_run: bool = False
) -> Iterator[ReplayStep]:
    """Each id in turn, one transaction each: an unknown id is a ``NOT_FOUND`` step, a
    pruned payload a skipped one; ``BrokerUnavailable`` stops the walk."""
    for event_id in event_ids:
        try:
            yield replay_event(context, event_id, dry_run=dry_run, skip_pruned=True)
        except NotFound:
            yield ReplayStep(event_id, None, None, ReplayAction.NOT_FOUND)
        except PayloadPruned:  # pruned between the read and the update
            yield ReplayStep(event_id, None, None, ReplayAction.SKIPPED_PAYLOAD_PRUNED)


def replay_range(
    context: OpsContext,
    events_in: ReplayRange,
    dry_run: bool = False,
    max_events: int = MAX_REPLAY_EVENTS,
) -> Iterator[ReplayStep]:
    """Every event of the range, oldest first, one transaction per event; at most
    ``max_events``. Yields a step per event."""
    after: EventCursor | None = None
    done = 0
    while done < max_events:
        with context.transaction() as conn:
            batch = store.events_to_replay(
                conn,
                since=events_in.since,
                until=events_in.until,
                statuses=events_in.statuses,
                after=after,
                limit=min(REPLAY_BATCH, max_events - done),
            )
        if not batch:
            return
        for row in batch:
            after = (row["received_at"], row["event_id"])
            done += 1
            step = ReplayStep(row["event_id"], row["type"], row["status"], ReplayAction.REQUEUED)
            if not row["has_payload"]:
                step = replace(step, action=ReplayAction.SKIPPED_PAYLOAD_PRUNED)
            elif dry_run:
                step = replace(step, action=ReplayAction.WOULD_REQUEUE)
            else:
                try:
                    step = replay_event(context, row["event_id"], skip_pruned=True)
                except (PayloadPruned, NotFound):  # pruned or deleted since the batch was read
                    step = replace(step, action=ReplayAction.SKIPPED_PAYLOAD_PRUNED)
            yield step
