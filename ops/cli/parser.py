"""The command line of ``vfy-pipeline``: its groups, commands and options, with their help."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from ops.cli import commands as c
from ops.cli import explain
from ops.cli.output import PROG
from ops.params import ANY, DEFAULT_LIMIT, MAX_LIMIT, one_of
from ops.service import ATTENTION_STATUSES, MAX_REPLAY_EVENTS
from schemas.vocabulary import ActionKind, EventStatus, FlagCategory, FlagStatus, JobName, values

TIME_HELP = "ISO 8601 time (naive = UTC), 'today', 'yesterday', or an age such as 90m, 24h, 7d"
EVENT_STATUS_HELP = f"{', '.join(values(EventStatus))} (repeat or comma-separate)"
RANGE_STATUS_HELP = (
    f"with a range: the statuses to replay (default {','.join(ATTENTION_STATUSES)}; "
    f"'{ANY}' for all)"
)


class Tree:
    """Adds groups and commands; every one takes ``--json``, lists ``--limit``/``--cursor``."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
        self.common = argparse.ArgumentParser(add_help=False)
        self.common.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for machines"
        )
        self.paged = argparse.ArgumentParser(add_help=False)
        self.paged.add_argument(
            "--limit", help=f"rows per page (1-{MAX_LIMIT}, default {DEFAULT_LIMIT})"
        )
        self.paged.add_argument("--cursor", help="the cursor the previous page printed")

    def group(self, name: str, help_text: str) -> Any:
        p = self.groups.add_parser(
            name, help=help_text, description=help_text, parents=[self.common]
        )
        return p.add_subparsers(dest="command", required=True, metavar="ACTION")

    def command(
        self,
        sub: Any,
        name: str,
        run: c.Command | explain.EnvironCommand,
        help_text: str,
        paged: bool = False,
    ) -> argparse.ArgumentParser:
        parents: Sequence[argparse.ArgumentParser] = [self.common, *([self.paged] if paged else [])]
        p: argparse.ArgumentParser = sub.add_parser(
            name, help=help_text, description=help_text, parents=parents
        )
        p.set_defaults(handler=run)
        return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="See and steer the Voucherify webhook pipeline: events, redemptions, "
        "flags, dead letters, replays, stats. Reads DATABASE_URL and REDIS_URL.",
        epilog="Examples: '%(prog)s redemptions show r_123', "
        f"'%(prog)s events list --status {','.join(ATTENTION_STATUSES)} --since today', "
        "'%(prog)s events replay --since today --dry-run'.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON for machines")
    parser.add_argument(
        "--version", action="version", version=f"{PROG} {explain.package_version()}"
    )
    tree = Tree(parser)
    add_events(tree)
    add_lookups(tree)
    add_flags(tree)
    add_dead_letters(tree)
    tree.command(
        tree.groups, "stats", c.stats, "queue, lag, failures, flags and dead letters right now"
    )
    add_jobs(tree)
    add_config(tree)
    add_migrations(tree)
    return parser


def add_config(tree: Tree) -> None:
    config = tree.group("config", "the configuration the processes read from the environment")
    p = tree.command(
        config,
        "check",
        explain.config_check,
        "read the environment exactly as a process does and print every setting, secrets "
        "redacted; exit 2 with that process's one-line error when a setting is missing or bad",
    )
    p.add_argument(
        "--process",
        choices=explain.CHECKED_PROCESSES,
        default="web",
        help="whose rules (default web: it also needs VOUCHERIFY_WEBHOOK_SECRET)",
    )
    p.set_defaults(needs_settings=False)


def add_migrations(tree: Tree) -> None:
    migrations = tree.group("migrations", "the database schema's migrations")
    tree.command(
        migrations,
        "status",
        explain.migrations_status,
        "every migration, applied (when) or pending; exit 1 when one is pending or the "
        "database has one this code does not know",
    )


def add_jobs(tree: Tree) -> None:
    jobs = tree.group("jobs", "reconciliation jobs: run one now")
    p = tree.command(
        jobs,
        "run",
        c.jobs_run,
        "run a job now, as beat would (under its lock, recorded in job_runs), and print its "
        "result as JSON; exit 0 when it succeeded, 1 when it failed, 3 when it did not run "
        "(another run holds its lock, or verify has no API settings)",
    )
    p.add_argument("job", choices=values(JobName), metavar="JOB", help=", ".join(JobName))


def add_events(tree: Tree) -> None:
    events = tree.group("events", "events: show one with its deliveries, list, replay")
    p = tree.command(events, "show", c.event_show, "show an event, its deliveries and dead letters")
    p.add_argument("event_id", metavar="EVENT_ID")
    p = tree.command(events, "list", c.events_list, "list events, newest first", paged=True)
    p.add_argument("--status", action="append", help=EVENT_STATUS_HELP)
    p.add_argument("--type", help="event type, e.g. redemption.succeeded")
    p.add_argument("--since", help=f"received at or after: {TIME_HELP}")
    p.add_argument("--until", help=f"received before: {TIME_HELP}")
    p = tree.command(
        events,
        "replay",
        c.events_replay,
        "send events back to the workers, by id or by received-at range; --dry-run prints "
        "row by row what would change and does nothing",
    )
    p.add_argument("--id", action="append", metavar="EVENT_ID", help="an event id (repeatable)")
    p.add_argument("--since", help=f"range start, received at or after: {TIME_HELP}")
    p.add_argument("--until", help=f"range end, received before: {TIME_HELP}")
    p.add_argument("--status", action="append", help=RANGE_STATUS_HELP)
    p.add_argument(
        "--max", type=int, default=MAX_REPLAY_EVENTS, help="replay at most this many events"
    )
    p.add_argument("--dry-run", action="store_true", help="print what would change; do nothing")


def add_lookups(tree: Tree) -> None:
    redemptions = tree.group("redemptions", "redemptions: what happened to one")
    p = tree.command(
        redemptions, "show", c.redemption_show, "a redemption with its events, ledger and flags"
    )
    p.add_argument("redemption_id", metavar="REDEMPTION_ID")

    orders = tree.group("orders", "orders: show one")
    p = tree.command(orders, "show", c.order_show, "an order with its redemptions and events")
    p.add_argument("order_id", metavar="ORDER_ID")

    customers = tree.group("customers", "customers: the ledger")
    p = tree.command(
        customers, "ledger", c.customer_ledger, "a customer's ledger entries and totals", True
    )
    p.add_argument("customer_id", metavar="CUSTOMER_ID")

    p = tree.command(
        tree.groups,
        "search",
        c.search,
        "find an id: event, delivery, redemption, rollback, voucher code, order or customer",
    )
    p.add_argument("q", metavar="ID")


def add_flags(tree: Tree) -> None:
    flags = tree.group("flags", "flags raised for a person: list, resolve, act")
    p = tree.command(flags, "list", c.flags_list, "list flags, newest first", paged=True)
    p.add_argument("--status", help=one_of(values(FlagStatus)))
    p.add_argument("--code", help="failure code, e.g. already_rolled_back")
    p.add_argument("--category", help=one_of(values(FlagCategory)))
    p = tree.command(
        flags, "resolve", c.flags_resolve, "resolve a flag (again: harmless, unchanged)"
    )
    p.add_argument("flag_id", metavar="FLAG_ID")
    p.add_argument("--note", help="what was done about it")
    p = tree.command(
        flags,
        "act",
        c.flags_act,
        "compensate, retry or settle a flag through Voucherify's API: previews, then acts "
        "once confirmed (--yes, or y at the prompt)",
    )
    p.add_argument("flag_id", metavar="FLAG_ID")
    p.add_argument("--kind", required=True, choices=values(ActionKind))
    p.add_argument("--yes", action="store_true", help="act without asking")
    p.add_argument("--by", help="who asks (the audit log's requested_by; default: $USER)")


def add_dead_letters(tree: Tree) -> None:
    letters = tree.group("dead-letters", "payloads that failed validation: list, replay")
    p = tree.command(letters, "list", c.dead_letters_list, "list dead letters, newest first", True)
    p.add_argument("--type", help="event type")
    p.add_argument("--pending", action="store_true", help="only those not replayed yet")
    p = tree.command(letters, "replay", c.dead_letters_replay, "send a dead letter's event back")
    p.add_argument("dead_letter_id", metavar="DEAD_LETTER_ID")
    p.add_argument("--dry-run", action="store_true", help="print what would change; do nothing")
