"""Load figures of the whole pipeline, against a bare Flask app in the same run.

    .venv/bin/python -m bench.load [--deliveries 20000] [--concurrency 50] [--quick]

Starts its own PostgreSQL (fsync on) and Redis (AOF, appendfsync everysec: the README's
settings), then the ``web`` (gunicorn with ``web/gunicorn.py``, WEB_CONCURRENCY=2) and
one ``worker`` (prefork, WORKER_CONCURRENCY=2: the machine has two cores) as the Procfile
runs them, and sends N signed deliveries from ``devtools/stream.py`` (gift and loyalty card
redemptions, rollbacks and failed rollbacks, 10 % duplicates, 5 % out of order) from
``--concurrency`` threads with keep-alive connections, as fast as they are answered. The
worker consumes while the deliveries arrive. Measured:

- receiver req/s, and ack latency p50 / p99 (the sender's clock, request sent to answer);
- end-to-end lag p50 / p99 per event (from the database: ``events.processed_at`` minus the
  ``received_at`` of its first delivery);
- drain time: from the last 202 to the last event processed;
- peak RSS (VmHWM) of every process: web master and workers, Celery main and pool children,
  redis-server.

Then, in the same run, the same deliveries from the same sender to ``bench.bare_app:app``
(a Flask view that only answers 202) under the same gunicorn settings: the ratio is what
our receiver costs. Prints a table; writes per-request and per-event records to
``bench/out/`` and plots them to ``docs/figures/load.png``; redraws
``docs/figures/under_fire.png`` from the fault suite's records when they exist. The sender
runs on the same two cores as everything else: its CPU time is printed with the figures.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil

from bench.common import APPS, ROOT, conclude
from bench.figures import FIGURES, Records, plot_fault_run, plot_run
from bench.stack import Bench, SendRun, peak_rss, send_and_settle
from devtools.sender import percentile
from devtools.stream import Stream, build_stream

OUT = ROOT / "bench" / "out"
COMMAND = ".venv/bin/python -m bench.load"
Lags = list[tuple[str, float, float]]
"""(event id, first received, processed) as epoch seconds, per event of the run."""


@dataclass
class Measured:
    runs: tuple[SendRun, SendRun, SendRun]
    """The pipeline, the receiver alone, the bare Flask app."""
    lags: Lags
    drain: float
    """Seconds from the last 202 to the last event processed."""
    problems: list[str]


def write_records(run: SendRun, lags: Lags) -> Records:
    OUT.mkdir(parents=True, exist_ok=True)
    start = run.sender.started_wall
    records = Records(
        requests=[(a.sent_at, a.ack_ms, a.status) for a in run.sender.attempts],
        lags=[(r - start, (p - r) * 1000) for _, r, p in lags],
    )
    with (OUT / "load_requests.csv").open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["t_s", "ack_ms", "status", "index", "attempt"])
        for a in sorted(run.sender.attempts, key=lambda a: a.sent_at):
            writer.writerow([f"{a.sent_at:.4f}", f"{a.ack_ms:.2f}", a.status, a.index, a.attempt])
    with (OUT / "load_lag.csv").open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["received_t_s", "processed_t_s", "lag_ms", "event_id"])
        for event_id, r, p in sorted(lags, key=lambda row: row[1]):
            writer.writerow(
                [f"{r - start:.4f}", f"{p - start:.4f}", f"{(p - r) * 1000:.1f}", event_id]
            )
    return records


def machine() -> str:
    memory = psutil.virtual_memory().total / 2**30
    cpu = platform.processor() or platform.machine()
    return (
        f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deliveries", type=int, default=None, help="default 20000")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="a short run (2000 deliveries)")
    parser.add_argument("--web-concurrency", type=int, default=2)
    parser.add_argument("--worker-concurrency", type=int, default=2)
    parser.add_argument("--no-plots", action="store_true")
    return parser.parse_args()


def measure(bench: Bench, n: int, stream: Stream, warm: Stream) -> Measured:
    """The pipeline, then the same web with its worker stopped, then the bare Flask app."""
    bench.start_servers()
    worker = bench.worker()
    web, port = bench.web(APPS["ours"])
    print("sending to the pipeline ...", flush=True)
    ours = send_and_settle(bench, "ours", warm, stream, port, settle=True)
    lags, outcomes, drain = settle_pipeline(bench, ours, n)
    ours.rss = peak_rss("web master", web) + peak_rss("celery main", worker)
    if bench.broker.process is not None:
        ours.rss += peak_rss("redis-server", bench.broker.process.pid)
    bench.stop(worker)

    # The same web with no worker beside it: what the receiver does with both cores.
    print("sending to the receiver alone (worker stopped) ...", flush=True)
    alone = bench.send("receiver alone", stream, port)
    bench.drop_queue()
    bench.stop(web)

    print("sending to the bare Flask app ...", flush=True)
    bare_web, bare_port = bench.web(APPS["bare"])
    bare = send_and_settle(bench, "bare", warm, stream, bare_port, settle=False)
    bare.rss = peak_rss("web master", bare_web)
    bench.stop(bare_web)
    problems = ours.problems() + alone.problems() + bare.problems()
    expected_events = len(stream.event_ids)
    if outcomes != {"processed": expected_events}:
        problems.append(f"events: {outcomes}, expected {expected_events} processed")
    return Measured((ours, alone, bare), lags, drain, problems)


def settle_pipeline(bench: Bench, ours: SendRun, n: int) -> tuple[Lags, dict[str, int], float]:
    """Wait until the worker has recorded every delivery answered 202; the lags, the
    events' outcomes and the drain time."""
    last_202 = ours.sender.started_wall + max(
        a.sent_at + a.ack_ms / 1000 for a in ours.sender.attempts
    )
    ids = [a.delivery_id for a in ours.sender.accepted().values() if a.delivery_id]
    bench.wait_settled(ids, timeout=n / 20 + 300)
    lags = bench.lags("load")
    outcomes = bench.outcomes()
    drain = max(p for _, _, p in lags) - last_202
    return lags, outcomes, drain


def plot(args: argparse.Namespace, n: int, ours: SendRun, lags: Lags) -> None:
    records = write_records(ours, lags)
    title = (
        f"Load: {n} deliveries at concurrency {args.concurrency}, web + 1 worker on "
        f"{os.cpu_count()} cores ({COMMAND})"
    )
    paths = [plot_run(records, title, FIGURES / "load.png")]
    fault_plot = plot_fault_run()
    if fault_plot is not None:
        paths.append(fault_plot)
    print("plots: " + ", ".join(str(p.relative_to(ROOT)) for p in paths))


def main() -> int:
    args = parse_args()
    n = args.deliveries or (2000 if args.quick else 20_000)

    print(f"building {n} deliveries ...", flush=True)
    stream = build_stream(n, seed=11, prefix="load")
    warm = build_stream(max(200, args.concurrency * 10), seed=12, prefix="warm")
    workdir = Path(tempfile.mkdtemp(prefix="vfy-bench-load-"))
    bench = Bench(args, workdir)
    try:
        measured = measure(bench, n, stream, warm)
    finally:
        bench.stop_all()

    lag_ms = [(p - r) * 1000 for _, r, p in measured.lags]
    report(args, n, stream, measured.runs, lag_ms, measured.drain)
    if not args.no_plots:
        plot(args, n, measured.runs[0], measured.lags)
    return conclude(
        measured.problems, workdir, "\nFAILED CHECKS:\n  {problems}\n(servers' data: {workdir})"
    )


def report(
    args: argparse.Namespace,
    n: int,
    stream: Stream,
    runs: tuple[SendRun, SendRun, SendRun],
    lag_ms: list[float],
    drain: float,
) -> None:
    ours, alone, bare = runs
    mix = stream.mix()
    print(
        f"\nLoad figures, {datetime.now(UTC):%Y-%m-%d}: {n} signed deliveries "
        f"({mix['events']} events: {mix['redemptions']} redemptions, {mix['rollbacks']} "
        f"rollbacks, {mix['rollback_failures']} failed rollbacks; {mix['duplicates']} "
        f"duplicates, {mix['out_of_order']} out of order), concurrency {args.concurrency}"
    )
    print(f"machine: {machine()}")
    print(
        f"web: gunicorn gthread WEB_CONCURRENCY={args.web_concurrency} x 8 threads; worker: "
        f"1 x prefork {args.worker_concurrency}; PostgreSQL 16 fsync on; Redis AOF everysec"
    )
    print(f"command: {COMMAND} --deliveries {n} --concurrency {args.concurrency}\n")
    print(
        "pipeline: web and worker together, the worker consuming while the deliveries "
        "arrive; receiver alone: the same web, worker stopped; bare: bench.bare_app, same "
        "gunicorn settings\n"
    )

    def row(name: str, *cells: str) -> None:
        print(f"| {name:<34} | " + " | ".join(f"{c:>10}" for c in cells) + " |")

    row("figure", "pipeline", "rcv alone", "bare Flask", "pipe/bare", "alone/bare")
    print(f"|{'-' * 36}|" + "|".join(["-" * 11 + ":"] * 5) + "|")
    figures: list[tuple[str, Callable[[SendRun], float], str]] = [
        ("receiver req/s", lambda r: r.rps, "{:.0f}"),
        ("ack p50 ms", lambda r: r.ack(50), "{:.1f}"),
        ("ack p99 ms", lambda r: r.ack(99), "{:.1f}"),
    ]
    for name, value, fmt in figures:
        a, b, c = value(ours), value(alone), value(bare)
        row(name, fmt.format(a), fmt.format(b), fmt.format(c), f"{a / c:.2f}", f"{b / c:.2f}")
    row("end-to-end lag p50 ms", f"{percentile(lag_ms, 50):.0f}", "-", "-", "", "")
    row("end-to-end lag p99 ms", f"{percentile(lag_ms, 99):.0f}", "-", "-", "", "")
    row("drain s (last 202 → last event)", f"{drain:.1f}", "-", "-", "", "")
    row("sending s", *(f"{r.seconds:.1f}" for r in runs), "", "")
    row("load generator CPU s", *(f"{r.cpu_seconds:.1f}" for r in runs), "", "")
    bare_rss = dict(bare.rss)
    for name, mb in ours.rss:
        other = f"{bare_rss[name]:.0f}" if name in bare_rss else "-"
        row(f"peak RSS MB {name}", f"{mb:.0f}", "", other, "", "")


if __name__ == "__main__":
    started = time.monotonic()
    status = main()
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    sys.exit(status)
