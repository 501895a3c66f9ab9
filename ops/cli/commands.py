"""The commands of ``vfy-pipeline``: each parses its options, asks ``ops.service`` and
prints the answer (the API's document with ``--json``, lines for people without).

A command returns its exit status; ``NotFound``, ``PayloadPruned``, ``BrokerUnavailable``
and ``ParamError`` are turned into one line on stderr by ``ops.cli.main``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

from ops import service
from ops.cli.output import Output, complain, seconds, text
from ops.context import OpsContext
from ops.params import ParamError, Query, parse_id
from ops.service import ReplayAction, ReplayStep
from ops.stats import pipeline_stats
from schemas.vocabulary import EventStatus, JobOutcome

Command = Callable[[argparse.Namespace, OpsContext, Output], int]
EVENT_FIELDS = (
    "type",
    "status",
    "attempts",
    "last_error",
    "event_created_at",
    "received_at",
    "processed_at",
    "redemption_id",
    "order_id",
    "customer_id",
    "has_payload",
)
REDEMPTION_FIELDS = (
    "status",
    "order_id",
    "customer_id",
    "voucher_code",
    "voucher_type",
    "amount",
    "redeemed_at",
    "failure_code",
    "failure_message",
    "rollback_id",
    "rollback_at",
    "rollback_reason",
)
ORDER_FIELDS = ("status", "amount", "total_amount", "customer_id", "source_updated_at")
SEARCH_KINDS = ("events", "redemptions", "orders", "customers")


def options(args: argparse.Namespace, *names: str) -> Query:
    """The options ``names`` as the service's filters read them."""
    return {name: getattr(args, name, None) for name in names}


def positional_id(name: str, raw: str) -> int:
    found = parse_id(name, raw)
    if found is None:
        raise ParamError(name, "expected an integer id")
    return found


def show(out: Output, document: Any) -> bool:
    """With ``--json``, print the document and say so; else let the caller write lines."""
    if out.as_json:
        out.json(document)
    return out.as_json


# --- reading ----------------------------------------------------------------------------


def event_show(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    row = service.event(ctx, args.event_id)
    if show(out, row):
        return 0
    out.line(f"event {row['event_id']}")
    out.fields(row, EVENT_FIELDS)
    out.section("deliveries", row["deliveries"], ["delivery_id", "received_at", "outcome"])
    if row["dead_letters"]:
        out.section(
            "dead letters", row["dead_letters"], ["id", "reason", "created_at", "replayed_at"]
        )
    return 0


def events_list(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    wanted = service.EventFilter.parse(
        options(args, "status", "type", "since", "until", "cursor", "limit")
    )
    found = service.events(ctx, wanted)
    if show(out, found.as_dict()):
        return 0
    out.table(found.items, ["event_id", "type", "status", "attempts", "received_at", "last_error"])
    out.more(found.next_cursor)
    return 0


def redemption_show(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    row = service.redemption(ctx, args.redemption_id)
    if show(out, row):
        return 0
    out.line(f"redemption {row['redemption_id']}")
    out.fields(row, REDEMPTION_FIELDS)
    out.section(
        "events", row["events"], ["event_id", "type", "status", "received_at", "last_error"]
    )
    out.section(
        "ledger", row["ledger_entries"], ["kind", "amount", "effect", "reason", "created_at"]
    )
    out.section("flags", row["flags"], ["id", "category", "failure_code", "status", "note"])
    return 0


def order_show(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    row = service.order(ctx, args.order_id)
    if show(out, row):
        return 0
    out.line(f"order {row['order_id']}")
    out.fields(row, ORDER_FIELDS)
    out.section(
        "redemptions", row["redemptions"], ["redemption_id", "status", "voucher_code", "amount"]
    )
    out.section("events", row["events"], ["event_id", "type", "status", "received_at"])
    return 0


def customer_ledger(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    paging = service.Paging.parse(options(args, "cursor", "limit"))
    row = service.ledger(ctx, args.customer_id, paging)
    if show(out, row):
        return 0
    out.line(f"customer {row['customer_id']}")
    out.line("  totals  " + "  ".join(f"{k} {v}" for k, v in row["totals"].items()))
    out.line()
    out.table(
        row["entries"],
        ["id", "kind", "amount", "effect", "redemption_id", "redeemer_id", "reason", "moved_at"],
    )
    out.more(row["next_cursor"])
    return 0


def search(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    found = service.search(ctx, args.q)
    hits = sum(len(found[kind]) for kind in SEARCH_KINDS)
    if not show(out, found):
        for kind in SEARCH_KINDS:
            for row in found[kind]:
                out.line(f"{kind[:-1]:<11} " + "  ".join(text(v) for v in row.values()))
        if not hits:
            complain(f"nothing has the id {args.q!r}")
    return 0 if hits else 1


def flags_list(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    wanted = service.FlagFilter.parse(
        options(args, "status", "code", "category", "cursor", "limit")
    )
    found = service.flags(ctx, wanted)
    if show(out, found.as_dict()):
        return 0
    out.table(
        found.items,
        ["id", "category", "redemption_id", "failure_code", "status", "created_at", "note"],
    )
    out.more(found.next_cursor)
    return 0


def dead_letters_list(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    query = {
        **options(args, "type", "cursor", "limit"),
        "replayed": "false" if args.pending else None,
    }
    found = service.dead_letters(ctx, service.DeadLetterFilter.parse(query))
    if show(out, found.as_dict()):
        return 0
    out.table(found.items, ["id", "event_id", "type", "created_at", "replayed_at", "reason"])
    out.more(found.next_cursor)
    return 0


def stats(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    document = pipeline_stats(ctx)
    if show(out, document):
        return 0

    def counts(values: dict[str, Any]) -> str:
        return "  ".join(f"{k} {v}" for k, v in values.items()) or "-"

    lag = document["lag_last_hour_seconds"]
    depth = document["queue_depth"]
    out.line(f"generated at      {text(document['generated_at'])}")
    out.line(f"events by status  {counts(document['events_by_status'])}")
    out.line(f"last hour         {counts(dict(sorted(document['deliveries_last_hour'].items())))}")
    out.line(
        f"lag last hour     p50 {seconds(lag['p50'])}  p95 {seconds(lag['p95'])}  "
        f"max {seconds(lag['max'])}  ({lag['count']} events)"
    )
    out.line(
        f"waiting events    {document['waiting_events']}  oldest "
        f"{seconds(document['oldest_waiting_event_age_seconds'])}"
    )
    out.line(f"queue depth       {counts(depth) if depth else '? (Redis unreadable)'}")
    out.line(f"open flags        {counts(document['open_flags'])}")
    out.line(f"dead letters      {document['dead_letters_pending']} to replay")
    return 0


# --- steering ---------------------------------------------------------------------------


def flags_resolve(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    row = service.resolve_flag(ctx, positional_id("FLAG_ID", args.flag_id), args.note)
    if not show(out, row):
        out.line(f"flag {row['id']} {row['status']} at {text(row['resolved_at'])}")
    return 0


def flags_act(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    """Preview the action; do it with ``--yes`` or a ``y`` at the prompt (a terminal only:
    without one and without ``--yes`` nothing is done)."""
    from workers.jobs.flag_actions import ActionRefused  # the apply path: when acting

    flag_id = positional_id("FLAG_ID", args.flag_id)
    by = args.by or f"cli:{os.environ.get('USER') or 'unknown'}"
    body: dict[str, Any] = {"kind": args.kind, "confirm": False, "by": by}
    try:
        if not args.yes:
            shown = service.flag_action(ctx, flag_id, body, by=by)
            if show(out, shown):
                return 0  # the preview's document; --yes acts
            _preview_lines(out, shown)
            if not (sys.stdin.isatty() and input("Do it? [y/N] ").strip().lower() == "y"):
                out.line("not done: run again with --yes to act")
                return 0
        done = service.flag_action(ctx, flag_id, {**body, "confirm": True}, by=by)
    except ActionRefused as exc:
        if out.as_json:
            out.json({"error": exc.code, "detail": exc.detail})
        complain(f"{exc.code}: {exc.detail}")
        return 1
    if not show(out, done):
        out.line(f"action {done['id']} {done['state']}: {text(done.get('error'))}")
    return 0 if done["state"] == "succeeded" else 1


def _preview_lines(out: Output, shown: dict[str, Any]) -> None:
    out.line(f"{shown['kind']} of redemption {shown['redemption_id']}:")
    for card in shown.get("cards") or []:
        out.line(
            f"  add {card['amount']} {card['kind']} to card {card['voucher_id']}"
            f" (Voucherify's balance now: {text(card.get('balance_now'))})"
        )
    if not shown.get("cards"):
        for call in shown["calls"]:
            out.line(f"  {call['method']} {call['path']} reason {call['reason']!r}")
        if not shown["calls"]:
            out.line("  no write: settled from what Voucherify reports now")


def step_line(step: ReplayStep) -> str:
    change = f"-> {EventStatus.RECEIVED}" if step.requeues else "(unchanged)"
    return f"{step.action:<24} {step.event_id}  {step.type}  {step.status_before} {change}"


def dead_letters_replay(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    letter_id = positional_id("DEAD_LETTER_ID", args.dead_letter_id)
    step = service.replay_dead_letter(ctx, letter_id, dry_run=args.dry_run)
    if not show(out, {"status": step.action, **step.as_dict()}):
        out.line(step_line(step))
    return 0


def events_replay(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    if args.id and (args.since or args.until):
        raise ParamError("id", "give event ids or a --since/--until range, not both")
    if not args.id and not args.since:
        raise ParamError("since", "give event ids (--id) or a range start (--since)")
    if args.id:
        steps = service.replay_events(ctx, args.id, dry_run=args.dry_run)
    else:
        events_in = service.ReplayRange.parse(options(args, "since", "until", "status"))
        steps = service.replay_range(ctx, events_in, dry_run=args.dry_run, max_events=args.max)
    return report_replay(out, steps, dry_run=args.dry_run, by_id=bool(args.id))


def report_replay(out: Output, steps: Iterable[ReplayStep], dry_run: bool, by_id: bool) -> int:
    """A line per step as it happens, then the totals. Exit 1 when an id given was not
    found or not replayed (a pruned payload), or Redis stopped the replay."""
    done: list[ReplayStep] = []
    failed = False
    try:
        for step in steps:
            if step.action is ReplayAction.NOT_FOUND:
                complain(f"not found: event {step.event_id}")
                failed = True
                continue
            if by_id and not dry_run and step.action is ReplayAction.SKIPPED_PAYLOAD_PRUNED:
                failed = True
            done.append(step)
            if not out.as_json:
                out.line(step_line(step))
    except service.BrokerUnavailable as exc:
        complain(f"Redis did not take the message ({exc}); stopped")
        failed = True
    count = {action: sum(s.action is action for s in done) for action in ReplayAction}
    requeued, would = count[ReplayAction.REQUEUED], count[ReplayAction.WOULD_REQUEUE]
    skipped = count[ReplayAction.SKIPPED_PAYLOAD_PRUNED]
    if out.as_json:
        out.json(
            {
                "dry_run": dry_run,
                "items": [s.as_dict() for s in done],
                "requeued": requeued,
                "would_requeue": would,
                "skipped": skipped,
            }
        )
    elif dry_run:
        out.line(f"dry run: {would} event(s) would be re-queued, {skipped} skipped; nothing done")
    else:
        out.line(f"{requeued} event(s) re-queued, {skipped} skipped")
    return 1 if failed else 0


# --- jobs -------------------------------------------------------------------------------

DID_NOT_RUN = 3
"""Exit status of ``jobs run`` when the job was skipped (lock held) or disabled."""


def jobs_run(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    """One run of a job, now: the same ``run_job`` the scheduled tasks call. Its result is
    printed as JSON, ``--json`` or not (docs/contract.md, "Command line")."""
    from workers.jobs import run_job  # the jobs' imports only for this command

    answer = run_job(args.job, ctx.settings, hard_limit=True)
    out.json(answer)
    status = answer["status"]
    if status == JobOutcome.SUCCEEDED:
        return 0
    return 1 if status == JobOutcome.FAILED else DID_NOT_RUN
