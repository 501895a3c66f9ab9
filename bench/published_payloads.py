"""The share of payloads Voucherify's published webhook schemas allow that the pipeline
applies, through the real receiver and worker (issue 11: target 100 %).

    .venv/bin/python -m bench.published_payloads [--per-type 20] [--seed 11] [--timeout 300]

Generates ``--per-type`` payloads of every type we handle (the redemption family,
``devtools.webhooks.REDEMPTION_FAMILY``, the card movements,
``workers.handlers.cards.CARD_MOVEMENT_TYPES``, and the order events,
``workers.handlers.orders.ORDER_EVENT_TYPES``) with ``devtools.payloads.webhook_envelope``,
as ``tests/workers/test_published_payloads.py`` draws them: hypothesis' own search,
seeded by ``--seed`` and the type: a seed gives the same payloads again on the same source
tree (hypothesis mixes the literals of the project's modules into its draws, so an edited
module can change them), but for the envelope and event ids, uuid4 by design. Any Unicode
in any free-text field, ``\\u0000`` and lone surrogates included; objects null or missing
optional fields; every enum value; extra fields. Every other body keeps its non-ASCII
characters raw (UTF-8), the rest are escaped; a lone surrogate, which UTF-8 cannot carry,
is always escaped.

Then starts the stack as ``bench.load`` does (``bench.stack``: embedded PostgreSQL, fsync
on, and Redis, the ``web`` under gunicorn and one Celery ``worker`` as the Procfile runs
them), POSTs every payload signed with ``devtools.webhooks.SECRET`` over HTTP, and waits
until the event of every accepted delivery is final. What is counted after the answers
comes from PostgreSQL, not from the sender: per type and in total, sent, answered 202,
processed (applied), ignored, dead-lettered with the dead letters' reasons, and the share
applied. Exits 1 when a delivery was not answered 202, or its event was not final within
``--timeout`` seconds (the work directory is kept, logs included); 0 otherwise, whatever
the share: the share is the figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from hypothesis import HealthCheck, Phase, given, seed, settings

from bench.common import conclude
from bench.stack import Bench
from devtools.payloads import webhook_envelope
from devtools.sender import Sender
from devtools.stream import Delivery
from devtools.webhooks import REDEMPTION_FAMILY, sign
from workers.handlers.cards import CARD_MOVEMENT_TYPES
from workers.handlers.orders import ORDER_EVENT_TYPES

COMMAND = ".venv/bin/python -m bench.published_payloads"
TYPES = REDEMPTION_FAMILY + CARD_MOVEMENT_TYPES + ORDER_EVENT_TYPES
FINAL = ("processed", "ignored", "dead")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-type", type=int, default=20, help="payloads per type (20)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--timeout", type=float, default=300, help="seconds for every event to be final"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="sender threads")
    parser.add_argument("--web-concurrency", type=int, default=2)
    parser.add_argument("--worker-concurrency", type=int, default=2)
    return parser.parse_args(argv)


# -- generating --------------------------------------------------------------------------


def generate(event_type: str, count: int, base_seed: int) -> list[dict[str, Any]]:
    """``count`` documents of ``event_type``, drawn by hypothesis' search as the property
    test draws them, seeded by ``base_seed`` and the type; rounds with the next seed until
    ``count`` are drawn (hypothesis may stop a round short)."""
    documents: list[dict[str, Any]] = []
    round_ = 0
    while len(documents) < count:
        round_seed = zlib.crc32(f"{base_seed}:{event_type}:{round_}".encode())

        @seed(round_seed)
        @settings(
            max_examples=count - len(documents),
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(document=webhook_envelope(event_type, surrogates=True))
        def draw(document: dict[str, Any]) -> None:
            documents.append(document)

        draw()
        round_ += 1
    return documents[:count]


def as_sent(document: dict[str, Any], raw_unicode: bool) -> bytes:
    """The body as it comes off the wire (UTF-8): non-ASCII characters raw or escaped; a
    lone surrogate, which UTF-8 cannot carry, always escaped."""
    if raw_unicode:
        try:
            return json.dumps(document, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            pass
    return json.dumps(document).encode("ascii")


def deliveries(per_type: int, base_seed: int) -> list[Delivery]:
    out: list[Delivery] = []
    for event_type in TYPES:
        for document in generate(event_type, per_type, base_seed):
            body = as_sent(document, raw_unicode=len(out) % 2 == 0)
            event_id = str(document["event"]["id"])
            out.append(Delivery(len(out), event_id, event_type, body, sign(body)))
    return out


# -- counting ----------------------------------------------------------------------------


@dataclass
class Row:
    sent: int = 0
    accepted: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)

    def add(self, other: Row) -> None:
        self.sent += other.sent
        self.accepted += other.accepted
        self.statuses.update(other.statuses)
        self.reasons.update(other.reasons)

    @property
    def share(self) -> float:
        return self.statuses["processed"] / self.sent if self.sent else 0.0


EVENTS_OF_DELIVERIES = """
SELECT d.delivery_id, e.status
FROM deliveries d JOIN events e USING (event_id)
WHERE d.delivery_id = ANY(%(ids)s)
"""

DEAD_LETTERS_OF_DELIVERIES = """
SELECT d.delivery_id, l.reason
FROM deliveries d JOIN dead_letters l USING (event_id)
WHERE d.delivery_id = ANY(%(ids)s)
"""


def wait_final(url: str, ids: list[str], timeout: float) -> dict[str, str]:
    """Each delivery's event status, once every one is final or ``timeout`` has passed."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            rows = conn.execute(EVENTS_OF_DELIVERIES, {"ids": ids}).fetchall()
            statuses = {str(r[0]): str(r[1]) for r in rows}
            if len(statuses) == len(ids) and all(s in FINAL for s in statuses.values()):
                return statuses
            if time.monotonic() > deadline:
                return statuses
            time.sleep(0.2)


def dead_reasons(url: str, ids: list[str]) -> dict[str, list[str]]:
    reasons: dict[str, list[str]] = {}
    with psycopg.connect(url) as conn:
        for delivery_id, reason in conn.execute(DEAD_LETTERS_OF_DELIVERIES, {"ids": ids}):
            reasons.setdefault(str(delivery_id), []).append(str(reason))
    return reasons


def tally(
    stream: list[Delivery],
    sender: Sender,
    statuses: dict[str, str],
    reasons: dict[str, list[str]],
) -> dict[str, Row]:
    rows = {event_type: Row() for event_type in TYPES}
    accepted = sender.accepted()
    for delivery in stream:
        row = rows[delivery.type]
        row.sent += 1
        attempt = accepted.get(delivery.index)
        if attempt is None or attempt.delivery_id is None:
            continue
        row.accepted += 1
        row.statuses[statuses.get(attempt.delivery_id, "not recorded")] += 1
        row.reasons.update(reasons.get(attempt.delivery_id, []))
    return rows


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def strings(value: Any) -> Iterator[str]:
    """Every key and string in a decoded JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def carried(stream: list[Delivery]) -> str:
    """What the bodies hold that a naive pipeline refuses, so the figure says what it covers."""
    nul = surrogate = 0
    for delivery in stream:
        text = "".join(strings(json.loads(delivery.body)))
        nul += "\x00" in text
        surrogate += LONE_SURROGATE.search(text) is not None
    raw = sum(not d.body.isascii() for d in stream)
    sizes = sorted(len(d.body) for d in stream)
    return (
        f"bodies: {nul} with a NUL (escaped), {surrogate} with a lone surrogate (escaped),"
        f" {raw} with raw UTF-8; {sizes[len(sizes) // 2]:,} bytes median, {sizes[-1]:,} max"
    )


def report(
    rows: dict[str, Row], args: argparse.Namespace, stream: list[Delivery], seconds: float
) -> Row:
    total = Row()
    print(
        f"Published payloads: {args.per_type} per type, seed {args.seed}, {len(rows)} types;"
        f" web gunicorn WEB_CONCURRENCY={args.web_concurrency}, worker prefork"
        f" {args.worker_concurrency}; Python {platform.python_version()};"
        f" {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {seconds:.0f} s from the stack's start"
        " to the last event final"
    )
    print(carried(stream))
    print(f"command: {COMMAND} --per-type {args.per_type} --seed {args.seed}\n")
    print("| type | sent | 202 | applied | ignored | dead-lettered | other | applied share |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for event_type, row in rows.items():
        total.add(row)
        print(line(f"`{event_type}`", row))
    print(line("**total**", total))
    if total.reasons:
        print("\ndead letters' reasons:")
        for reason, count in total.reasons.most_common():
            print(f"  {count:4d}  {reason}")
    else:
        print("\nno dead letters")
    return total


def line(label: str, row: Row) -> str:
    known = sum(row.statuses[s] for s in FINAL)
    other = row.accepted - known
    return (
        f"| {label} | {row.sent} | {row.accepted} | {row.statuses['processed']} |"
        f" {row.statuses['ignored']} | {row.statuses['dead']} | {other} | {row.share:.1%} |"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stream = deliveries(args.per_type, args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="vfy-bench-published-"))
    bench = Bench(args, workdir)
    problems: list[str] = []
    started = time.monotonic()
    try:
        bench.start_servers()
        _, port = bench.web("web.wsgi:app")
        bench.worker()
        sender = Sender(stream, port, threads=args.concurrency)
        if not sender.run(timeout=args.timeout):
            problems.append("the sender did not finish")
        accepted = [a.delivery_id for a in sender.accepted().values() if a.delivery_id]
        url = bench.postgres.url()
        statuses = wait_final(url, accepted, args.timeout)
        rows = tally(stream, sender, statuses, dead_reasons(url, accepted))
    finally:
        bench.stop_all()
    total = report(rows, args, stream, time.monotonic() - started)
    if total.accepted != total.sent:
        problems.append(f"answers {sender.status_histogram()}: not every delivery got a 202")
    unfinished = total.accepted - sum(total.statuses[s] for s in FINAL)
    if unfinished:
        problems.append(f"{unfinished} accepted deliveries not final after {args.timeout:.0f} s")
    return conclude(problems, workdir, "\nFAILED:\n  {problems}\nlogs and data kept in {workdir}")


if __name__ == "__main__":
    sys.exit(main())
