"""Load figures of the whole pipeline, against a bare Flask app in the same run.

    .venv/bin/python -m bench.load [--deliveries 20000] [--concurrency 50] [--quick]
        [--worker-batch-size 100] [--compare-unbatched] [--steady 40 --steady-seconds 30]

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

With ``--compare-unbatched``, the same deliveries again to the same web, the database and
Redis emptied, with a worker of ``WORKER_BATCH_SIZE=1`` (one task and one transaction per
delivery, as before issue 12): its drain time beside the batched one. With ``--steady
RATE``, a paced stream of ``RATE`` deliveries per second for ``--steady-seconds`` to the
pipeline (emptied again, the batched worker): the end-to-end lag p50 / p99 at a low rate,
where each batch waits for its flush deadline (``WORKER_BATCH_FLUSH_MS``).

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
import psycopg
import redis

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
    unbatched_drain: float | None = None
    """The same, with ``WORKER_BATCH_SIZE=1`` (``--compare-unbatched``)."""
    steady_lag_ms: list[float] | None = None
    """End-to-end lag of each event of the paced stream (``--steady``)."""


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
    parser.add_argument(
        "--worker-batch-size", type=int, default=None, help="WORKER_BATCH_SIZE (default 100)"
    )
    parser.add_argument(
        "--compare-unbatched", action="store_true", help="also drain with WORKER_BATCH_SIZE=1"
    )
    parser.add_argument("--steady", type=float, default=None, help="a paced phase, deliveries/s")
    parser.add_argument("--steady-seconds", type=float, default=30.0)
    return parser.parse_args()


def batch_env(args: argparse.Namespace) -> dict[str, str]:
    size = args.worker_batch_size
    return {} if size is None else {"WORKER_BATCH_SIZE": str(size)}


def empty_stores(bench: Bench) -> None:
    """The inbox and the queues emptied (every process but the web stopped)."""
    with psycopg.connect(bench.postgres.url(), autocommit=True) as conn:
        conn.execute(
            "TRUNCATE events, deliveries, dead_letters, orders, redemptions, ledger_entries,"
            " card_balances, flags RESTART IDENTITY CASCADE"
        )
    client = redis.Redis.from_url(bench.broker.url())
    client.flushdb()
    client.close()


def unbatched_drain(bench: Bench, port: int, n: int, stream: Stream, warm: Stream) -> float:
    """The drain time of the same deliveries with a worker of ``WORKER_BATCH_SIZE=1``."""
    empty_stores(bench)
    worker = bench.worker(WORKER_BATCH_SIZE="1")
    print("sending to the pipeline, batching off ...", flush=True)
    run = send_and_settle(bench, "unbatched", warm, stream, port, settle=True)
    _, _, drain = settle_pipeline(bench, run, n)
    bench.stop(worker)
    return drain


def steady_lags(
    bench: Bench, args: argparse.Namespace, port: int, warm: Stream
) -> tuple[list[float], list[str]]:
    """Lag (ms) of each event of a paced stream; problems of the phase."""
    empty_stores(bench)
    worker = bench.worker(**batch_env(args))
    stream = build_stream(int(args.steady * args.steady_seconds), seed=13, prefix="steady")
    print(f"sending to the pipeline at {args.steady:.0f}/s ...", flush=True)
    warm_run = bench.send("steady warm-up", warm, port)
    warm_ids = [a.delivery_id for a in warm_run.sender.accepted().values() if a.delivery_id]
    bench.wait_settled(warm_ids, timeout=120)
    run = bench.send("steady", stream, port, rate=args.steady)
    ids = [a.delivery_id for a in run.sender.accepted().values() if a.delivery_id]
    bench.wait_settled(ids, timeout=300)
    lags = [(p - r) * 1000 for _, r, p in bench.lags("steady")]
    bench.stop(worker)
    return lags, run.problems()


def measure(bench: Bench, n: int, stream: Stream, warm: Stream) -> Measured:
    """The pipeline, then the same web with its worker stopped, then the bare Flask app."""
    bench.start_servers()
    worker = bench.worker(**batch_env(bench.args))
    web, port = bench.web(APPS["ours"])
    print("sending to the pipeline ...", flush=True)
    ours = send_and_settle(bench, "ours", warm, stream, port, settle=True)
    lags, outcomes, drain = settle_pipeline(bench, ours, n)
    ours.rss = peak_rss("web master", web) + peak_rss("celery main", worker)
    if bench.broker.process is not None:
        ours.rss += peak_rss("redis-server", bench.broker.process.pid)
    bench.stop(worker)
    unbatched = (
        unbatched_drain(bench, port, n, stream, warm) if bench.args.compare_unbatched else None
    )
    steady: list[float] | None = None
    steady_problems: list[str] = []
    if bench.args.steady:
        steady, steady_problems = steady_lags(bench, bench.args, port, warm)
        empty_stores(bench)

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
    problems = ours.problems() + alone.problems() + bare.problems() + steady_problems
    expected_events = len(stream.event_ids)
    if outcomes != {"processed": expected_events}:
        problems.append(f"events: {outcomes}, expected {expected_events} processed")
    return Measured((ours, alone, bare), lags, drain, problems, unbatched, steady)


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
    report_batching(args, measured)
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


def report_batching(args: argparse.Namespace, measured: Measured) -> None:
    size = args.worker_batch_size or 100
    print(f"\nbatching (WORKER_BATCH_SIZE={size}), load average {os.getloadavg()[0]:.2f}:")
    if measured.unbatched_drain is not None:
        ratio = measured.unbatched_drain / measured.drain if measured.drain > 0 else float("inf")
        print(
            f"  drain s: batched {measured.drain:.1f}, WORKER_BATCH_SIZE=1 "
            f"{measured.unbatched_drain:.1f}: {ratio:.1f}x shorter (target >= 3x)"
        )
    if measured.steady_lag_ms:
        lags = measured.steady_lag_ms
        p50, p99 = percentile(lags, 50), percentile(lags, 99)
        print(
            f"  steady {args.steady:.0f}/s for {args.steady_seconds:.0f} s, {len(lags)} events: "
            f"lag p50 {p50:.0f} ms (target <= 60), p99 {p99:.0f} ms"
        )


if __name__ == "__main__":
    started = time.monotonic()
    status = main()
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    sys.exit(status)
