"""``vfy-pipeline``: the operators' command line (``vfy-pipeline --help``).

Reads its configuration from the environment like every process (``DATABASE_URL``,
``REDIS_URL``; without them, the embedded local servers) and talks to PostgreSQL and Redis
directly, through the same queries as the ops API and the dashboard. ``--json`` prints
machine-readable JSON (the API's documents); without it, lines for people.

Exit status: 0 done, 1 not found or refused (a pruned payload, Redis down), 2 usage or
configuration error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import psycopg

from config.entry import load_settings
from config.logs import JsonFormatter
from ops import queries, replay
from ops.context import OpsContext, direct_connect
from ops.params import (
    DEFAULT_LIMIT,
    FLAG_CATEGORIES,
    FLAG_STATUSES,
    ParamError,
    decode_event_cursor,
    dumps,
    encode_event_cursor,
    parse_choice,
    parse_id,
    parse_limit,
    parse_statuses,
    parse_time,
)
from ops.stats import pipeline_stats

PROG = "vfy-pipeline"
TIME_HELP = "ISO 8601 time (naive = UTC), 'today', 'yesterday', or an age such as 90m, 24h, 7d"

Handler = Callable[[argparse.Namespace, OpsContext, "Output"], int]


class Output:
    def __init__(self, as_json: bool, out: TextIO) -> None:
        self.as_json = as_json
        self.out = out

    def line(self, text: str = "") -> None:
        print(text, file=self.out)

    def json(self, document: Any) -> None:
        print(dumps(document, pretty=True), file=self.out)

    def fields(self, row: Mapping[str, Any], keys: Sequence[str]) -> None:
        width = max(len(k) for k in keys)
        for key in keys:
            if key in row:
                self.line(f"  {key.ljust(width)}  {_text(row[key])}")

    def table(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
        if not rows:
            self.line("  (none)")
            return
        cells = [[_text(row.get(c)) for c in columns] for row in rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        self.line("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
        for r in cells:
            self.line("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    return str(value).replace("\n", " ")


# --- commands ---------------------------------------------------------------------------


def event_show(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    with ctx.transaction() as conn:
        row = queries.event(conn, args.event_id)
    if row is None:
        return _not_found(out, "event", args.event_id)
    if out.as_json:
        out.json(row)
        return 0
    out.line(f"event {row['event_id']}")
    out.fields(
        row,
        [
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
        ],
    )
    out.line()
    out.line("deliveries:")
    out.table(row["deliveries"], ["delivery_id", "received_at", "outcome"])
    if row["dead_letters"]:
        out.line()
        out.line("dead letters:")
        out.table(row["dead_letters"], ["id", "reason", "created_at", "replayed_at"])
    return 0


def events_list(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    with ctx.transaction() as conn:
        rows, cursor = queries.events(
            conn,
            statuses=parse_statuses(args.status),
            event_type=args.type,
            since=parse_time("--since", args.since),
            until=parse_time("--until", args.until),
            cursor=decode_event_cursor(args.cursor),
            limit=parse_limit(args.limit),
        )
    next_cursor = encode_event_cursor(cursor)
    if out.as_json:
        out.json({"items": rows, "next_cursor": next_cursor})
        return 0
    out.table(rows, ["event_id", "type", "status", "attempts", "received_at", "last_error"])
    if next_cursor:
        out.line(f"more: --cursor {next_cursor}")
    return 0


def events_replay(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    if args.id and (args.since or args.until):
        raise ParamError("--id", "give event ids or a --since/--until range, not both")
    if not args.id and not args.since:
        raise ParamError("--since", "give event ids (--id) or a range start (--since)")
    steps: list[replay.ReplayStep] = []
    failed = False

    def report(step: replay.ReplayStep) -> None:
        steps.append(step)
        if not out.as_json:
            change = (
                f"{step.status_before} -> received"
                if step.action in ("requeued", "would_requeue")
                else f"{step.status_before} (unchanged)"
            )
            out.line(f"{step.action:<24} {step.event_id}  {step.type}  {change}")

    try:
        if args.id:
            for event_id in args.id:
                try:
                    report(replay.replay_event(ctx, event_id, dry_run=args.dry_run))
                except replay.NotFound:
                    failed = True
                    print(f"{PROG}: not found: event {event_id}", file=sys.stderr)
                except replay.PayloadPruned:
                    failed = True
                    report(replay.ReplayStep(event_id, "?", "?", "skipped_payload_pruned"))
        else:
            since = parse_time("--since", args.since)
            assert since is not None
            for step in replay.replay_range(
                ctx,
                since=since,
                until=parse_time("--until", args.until),
                statuses=parse_statuses(args.status or ["failed,dead"]),
                dry_run=args.dry_run,
                max_events=args.max,
            ):
                report(step)
    except replay.BrokerUnavailable as exc:
        print(f"{PROG}: Redis did not take the message ({exc}); stopped", file=sys.stderr)
        failed = True
    requeued = sum(s.action == "requeued" for s in steps)
    would = sum(s.action == "would_requeue" for s in steps)
    skipped = sum(s.action == "skipped_payload_pruned" for s in steps)
    if out.as_json:
        out.json(
            {
                "dry_run": args.dry_run,
                "items": [s.as_dict() for s in steps],
                "requeued": requeued,
                "would_requeue": would,
                "skipped": skipped,
            }
        )
    elif args.dry_run:
        out.line(f"dry run: {would} event(s) would be re-queued, {skipped} skipped; nothing done")
    else:
        out.line(f"{requeued} event(s) re-queued, {skipped} skipped")
    return 1 if failed else 0


def redemption_show(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    with ctx.transaction() as conn:
        row = queries.redemption(conn, args.redemption_id)
    if row is None:
        return _not_found(out, "redemption", args.redemption_id)
    if out.as_json:
        out.json(row)
        return 0
    out.line(f"redemption {row['redemption_id']}")
    out.fields(
        row,
        [
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
        ],
    )
    out.line()
    out.line("events:")
    out.table(row["events"], ["event_id", "type", "status", "received_at", "last_error"])
    out.line()
    out.line("ledger:")
    out.table(row["ledger_entries"], ["kind", "amount", "effect", "reason", "created_at"])
    out.line()
    out.line("flags:")
    out.table(row["flags"], ["id", "category", "failure_code", "status", "note"])
    return 0


def order_show(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    with ctx.transaction() as conn:
        row = queries.order(conn, args.order_id)
    if row is None:
        return _not_found(out, "order", args.order_id)
    if out.as_json:
        out.json(row)
        return 0
    out.line(f"order {row['order_id']}")
    out.fields(row, ["status", "amount", "total_amount", "customer_id", "source_updated_at"])
    out.line()
    out.line("redemptions:")
    out.table(row["redemptions"], ["redemption_id", "status", "voucher_code", "amount"])
    out.line()
    out.line("events:")
    out.table(row["events"], ["event_id", "type", "status", "received_at"])
    return 0


def customer_ledger(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    with ctx.transaction() as conn:
        if not queries.customer_known(conn, args.customer_id):
            return _not_found(out, "customer", args.customer_id)
        row = queries.ledger(
            conn,
            args.customer_id,
            cursor=parse_id("--cursor", args.cursor),
            limit=parse_limit(args.limit),
        )
    if out.as_json:
        out.json(row)
        return 0
    out.line(f"customer {row['customer_id']}")
    out.line(
        f"  totals  gift_credit {row['totals']['gift_credit']}  "
        f"loyalty_points {row['totals']['loyalty_points']}"
    )
    out.line()
    out.table(
        row["entries"], ["id", "kind", "amount", "effect", "redemption_id", "reason", "created_at"]
    )
    if row["next_cursor"]:
        out.line(f"more: --cursor {row['next_cursor']}")
    return 0


def search(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    with ctx.transaction() as conn:
        found = queries.search(conn, args.q)
    if out.as_json:
        out.json(found)
    else:
        for kind in ("events", "redemptions", "orders", "customers"):
            for row in found[kind]:
                out.line(f"{kind[:-1]:<11} " + "  ".join(_text(v) for v in row.values()))
    hits = sum(len(found[k]) for k in ("events", "redemptions", "orders", "customers"))
    if not hits and not out.as_json:
        print(f"{PROG}: nothing has the id {args.q!r}", file=sys.stderr)
    return 0 if hits else 1


def flags_list(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    with ctx.transaction() as conn:
        result = queries.flags(
            conn,
            status=parse_choice("--status", args.status, FLAG_STATUSES),
            failure_code=args.code,
            category=parse_choice("--category", args.category, FLAG_CATEGORIES),
            cursor=parse_id("--cursor", args.cursor),
            limit=parse_limit(args.limit),
        )
    if out.as_json:
        out.json(result.as_dict())
        return 0
    out.table(
        result.items,
        ["id", "category", "redemption_id", "failure_code", "status", "created_at", "note"],
    )
    if result.next_cursor:
        out.line(f"more: --cursor {result.next_cursor}")
    return 0


def flags_resolve(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    flag_id = parse_id("FLAG_ID", args.flag_id)
    assert flag_id is not None
    with ctx.transaction() as conn:
        row = queries.resolve_flag(conn, flag_id, args.note)
    if row is None:
        return _not_found(out, "flag", str(flag_id))
    if out.as_json:
        out.json(row)
    else:
        out.line(f"flag {row['id']} {row['status']} at {_text(row['resolved_at'])}")
    return 0


def dead_letters_list(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    with ctx.transaction() as conn:
        result = queries.dead_letters(
            conn,
            event_type=args.type,
            replayed=False if args.pending else None,
            cursor=parse_id("--cursor", args.cursor),
            limit=parse_limit(args.limit),
        )
    if out.as_json:
        out.json(result.as_dict())
        return 0
    out.table(result.items, ["id", "event_id", "type", "created_at", "replayed_at", "reason"])
    if result.next_cursor:
        out.line(f"more: --cursor {result.next_cursor}")
    return 0


def dead_letters_replay(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    letter_id = parse_id("DEAD_LETTER_ID", args.dead_letter_id)
    assert letter_id is not None
    if args.dry_run:
        with ctx.transaction() as conn:
            letter = queries.dead_letter(conn, letter_id)
        if letter is None:
            return _not_found(out, "dead letter", str(letter_id))
        action = "would_requeue" if letter["has_payload"] else "skipped_payload_pruned"
        step = replay.ReplayStep(letter["event_id"], letter["type"], letter["event_status"], action)
    else:
        try:
            step = replay.replay_dead_letter(ctx, letter_id)
        except replay.NotFound:
            return _not_found(out, "dead letter", str(letter_id))
        except replay.PayloadPruned:
            print(f"{PROG}: the event's payload was removed by retention", file=sys.stderr)
            return 1
        except replay.BrokerUnavailable as exc:
            print(f"{PROG}: Redis did not take the message ({exc})", file=sys.stderr)
            return 1
    if out.as_json:
        status = "requeued" if step.action == "requeued" else step.action
        out.json({"status": status, **step.as_dict()})
    else:
        out.line(
            f"{step.action:<24} {step.event_id}  {step.type}  {step.status_before} -> received"
        )
    return 0


def stats(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    document = pipeline_stats(ctx)
    if out.as_json:
        out.json(document)
        return 0
    lag = document["lag_last_hour_seconds"]
    out.line(f"generated at      {_text(document['generated_at'])}")
    out.line(
        "events by status  "
        + "  ".join(f"{k} {v}" for k, v in document["events_by_status"].items())
    )
    out.line(
        "last hour         "
        + (
            "  ".join(f"{k} {v}" for k, v in sorted(document["deliveries_last_hour"].items()))
            or "-"
        )
    )
    out.line(
        f"lag last hour     p50 {_secs(lag['p50'])}  p95 {_secs(lag['p95'])}  "
        f"max {_secs(lag['max'])}  ({lag['count']} events)"
    )
    out.line(
        f"waiting events    {document['waiting_events']}  oldest "
        f"{_secs(document['oldest_waiting_event_age_seconds'])}"
    )
    depth = document["queue_depth"]
    out.line(
        "queue depth       "
        + ("  ".join(f"{k} {v}" for k, v in depth.items()) if depth else "? (Redis unreadable)")
    )
    out.line(
        "open flags        " + "  ".join(f"{k} {v}" for k, v in document["open_flags"].items())
    )
    out.line(f"dead letters      {document['dead_letters_pending']} to replay")
    return 0


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def _not_found(out: Output, what: str, ident: str) -> int:
    if out.as_json:
        out.json({"error": "not_found"})
    print(f"{PROG}: not found: {what} {ident}", file=sys.stderr)
    return 1


# --- the parser -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for machines"
    )
    paged = argparse.ArgumentParser(add_help=False)
    paged.add_argument("--limit", default=DEFAULT_LIMIT, help="rows per page (1-500, default 50)")
    paged.add_argument("--cursor", help="the cursor the previous page printed")

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="See and steer the Voucherify webhook pipeline: events, redemptions, "
        "flags, dead letters, replays, stats. Reads DATABASE_URL and REDIS_URL.",
        epilog="Examples: '%(prog)s redemptions show r_123', "
        "'%(prog)s events list --status failed,dead --since today', "
        "'%(prog)s events replay --since today --dry-run'.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON for machines")
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")

    def command(
        sub: Any, name: str, handler: Handler, help_text: str, parents: Sequence[Any] = ()
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(
            name, help=help_text, description=help_text, parents=[common, *parents]
        )
        p.set_defaults(handler=handler)
        return p

    def group(name: str, help_text: str) -> Any:
        p = groups.add_parser(name, help=help_text, description=help_text, parents=[common])
        return p.add_subparsers(dest="command", required=True, metavar="ACTION")

    events = group("events", "events: show one with its deliveries, list, replay")
    p = command(events, "show", event_show, "show an event, its deliveries and dead letters")
    p.add_argument("event_id", metavar="EVENT_ID")
    p = command(events, "list", events_list, "list events, newest first", [paged])
    p.add_argument(
        "--status",
        action="append",
        help="received, processed, ignored, failed, dead (repeat or comma-separate)",
    )
    p.add_argument("--type", help="event type, e.g. redemption.succeeded")
    p.add_argument("--since", help=f"received at or after: {TIME_HELP}")
    p.add_argument("--until", help=f"received before: {TIME_HELP}")
    p = command(
        events,
        "replay",
        events_replay,
        "send events back to the workers, by id or by received-at range; --dry-run prints "
        "row by row what would change and does nothing",
    )
    p.add_argument("--id", action="append", metavar="EVENT_ID", help="an event id (repeatable)")
    p.add_argument("--since", help=f"range start, received at or after: {TIME_HELP}")
    p.add_argument("--until", help=f"range end, received before: {TIME_HELP}")
    p.add_argument(
        "--status",
        action="append",
        help="with a range: the statuses to replay (default failed,dead; 'any' for all)",
    )
    p.add_argument("--max", type=int, default=10_000, help="replay at most this many events")
    p.add_argument("--dry-run", action="store_true", help="print what would change; do nothing")

    redemptions = group("redemptions", "redemptions: what happened to one")
    p = command(
        redemptions, "show", redemption_show, "a redemption with its events, ledger and flags"
    )
    p.add_argument("redemption_id", metavar="REDEMPTION_ID")

    orders = group("orders", "orders: show one")
    p = command(orders, "show", order_show, "an order with its redemptions and events")
    p.add_argument("order_id", metavar="ORDER_ID")

    customers = group("customers", "customers: the ledger")
    p = command(
        customers, "ledger", customer_ledger, "a customer's ledger entries and totals", [paged]
    )
    p.add_argument("customer_id", metavar="CUSTOMER_ID")

    p = command(
        groups,
        "search",
        search,
        "find an id: event, delivery, redemption, rollback, voucher code, order or customer",
    )
    p.add_argument("q", metavar="ID")

    flags = group("flags", "flags raised for a person: list, resolve")
    p = command(flags, "list", flags_list, "list flags, newest first", [paged])
    p.add_argument("--status", help="open or resolved")
    p.add_argument("--code", help="failure code, e.g. already_rolled_back")
    p.add_argument("--category", help="already_rolled_back, review or drift")
    p = command(flags, "resolve", flags_resolve, "resolve a flag (again: harmless, unchanged)")
    p.add_argument("flag_id", metavar="FLAG_ID")
    p.add_argument("--note", help="what was done about it")

    letters = group("dead-letters", "payloads that failed validation: list, replay")
    p = command(letters, "list", dead_letters_list, "list dead letters, newest first", [paged])
    p.add_argument("--type", help="event type")
    p.add_argument("--pending", action="store_true", help="only those not replayed yet")
    p = command(letters, "replay", dead_letters_replay, "send a dead letter's event back")
    p.add_argument("dead_letter_id", metavar="DEAD_LETTER_ID")
    p.add_argument("--dry-run", action="store_true", help="print what would change; do nothing")

    command(groups, "stats", stats, "queue, lag, failures, flags and dead letters right now")
    return parser


def main(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    out: TextIO | None = None,
) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    environ = os.environ if environ is None else environ
    root = logging.getLogger()
    if not root.handlers:  # warnings and errors as JSON lines on stderr; stdout is the answer
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
        root.setLevel(logging.WARNING)

    settings = load_settings("cli", environ)
    assert settings.database_url is not None
    context = OpsContext(settings, connect=direct_connect(settings.database_url))
    output = Output(bool(getattr(args, "json", False)), out or sys.stdout)
    try:
        return int(args.handler(args, context, output))
    except ParamError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except psycopg.OperationalError as exc:
        print(f"{PROG}: PostgreSQL did not answer: {exc}", file=sys.stderr)
        return 1
    finally:
        context.close()


if __name__ == "__main__":
    sys.exit(main())
