"""Load figures of the whole pipeline, against a bare Flask app in the same run.

    .venv/bin/python -m bench.load [--deliveries 20000] [--concurrency 50] [--quick]

Starts its own PostgreSQL (fsync on) and Redis (AOF, appendfsync everysec: the README's
settings), then the ``web`` (gunicorn with ``config/gunicorn.py``, WEB_CONCURRENCY=2) and
one ``worker`` (prefork, WORKER_CONCURRENCY=2: the machine has two cores) as the Procfile
runs them, and sends N signed deliveries from ``bench/stream.py`` (gift and loyalty card
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
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psutil
import psycopg
import redis

from bench.figures import FIGURES, Records, plot_fault_run, plot_run
from bench.stream import Sender, Stream, build_stream, percentile
from config.local_servers import EmbeddedPostgres, EmbeddedRedis, free_port, wait_for_port
from migrations import apply_migrations
from tests.support import SECRET
from workers.messages import DELIVERY_QUEUE, PARKED_QUEUE

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
APPS = {"ours": "receiver.wsgi:app", "bare": "bench.bare_app:app"}
COMMAND = ".venv/bin/python -m bench.load"


@dataclass
class SendRun:
    label: str
    sender: Sender
    seconds: float
    cpu_seconds: float
    rss: list[tuple[str, float]] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.sender.attempts)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def ack(self, q: float) -> float:
        return percentile([a.ack_ms for a in self.sender.attempts if a.status == 202], q)

    def problems(self) -> list[str]:
        statuses = self.sender.status_histogram()
        if set(statuses) != {"202"} or self.sender.outcome.abandoned:
            return [f"{self.label}: answers {statuses}, abandoned {self.sender.outcome.abandoned}"]
        return []


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.postgres = EmbeddedPostgres(workdir / "pg", durable=True)
        self.broker = EmbeddedRedis(workdir / "redis", appendfsync="everysec")
        self.procs: list[subprocess.Popen[bytes]] = []

    # -- servers and processes ---------------------------------------------------------

    def start_servers(self) -> None:
        self.postgres.start()
        self.broker.start()
        with psycopg.connect(self.postgres.url(), autocommit=True) as conn:
            apply_migrations(conn)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_"))}
        env.update(
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",
            DATABASE_URL=self.postgres.url(),
            REDIS_URL=self.broker.url(),
            VOUCHERIFY_WEBHOOK_SECRET=SECRET,
            LOG_LEVEL="INFO",  # the production default: one line per event from the worker
            WORKER_METRICS_PORT="0",
        )
        env.update(extra)
        return env

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    def web(self, app: str) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        metrics = self.workdir / f"web-metrics-{port}"
        metrics.mkdir()
        env = self.env(
            PORT=str(port),
            WEB_CONCURRENCY=str(self.args.web_concurrency),
            PROMETHEUS_MULTIPROC_DIR=str(metrics),
        )
        args = [sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.py", app]
        proc = self.spawn(f"web-{app.split(':')[0]}", args, env)
        wait_for_port(port, timeout=30)
        return proc, port

    def worker(self) -> subprocess.Popen[bytes]:
        args = [
            sys.executable, "-m", "celery", "-A", "workers.app", "worker",
            "--queues", "deliveries,jobs", "--concurrency", str(self.args.worker_concurrency),
            "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO",
        ]  # fmt: skip
        return self.spawn("worker", args, self.env())

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def stop_all(self) -> None:
        for proc in self.procs:
            self.stop(proc)
        self.broker.stop()
        self.postgres.stop()

    # -- measuring -----------------------------------------------------------------------

    def send(self, label: str, stream: Stream, port: int) -> SendRun:
        sender = Sender(stream.deliveries, port, threads=self.args.concurrency)
        me = psutil.Process()
        cpu_before = sum(me.cpu_times()[:2])
        ok = sender.run(timeout=len(stream.deliveries) / 20 + 300)
        if not ok:
            raise SystemExit(f"{label}: the sender did not finish")
        cpu = sum(me.cpu_times()[:2]) - cpu_before
        seconds = max(a.sent_at + a.ack_ms / 1000 for a in sender.attempts) - min(
            a.sent_at for a in sender.attempts
        )
        return SendRun(label, sender, seconds, cpu)

    def wait_settled(self, ids: list[str], timeout: float) -> None:
        client = redis.Redis.from_url(self.broker.url())
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.postgres.url(), autocommit=True) as conn:
            while True:
                row = conn.execute(
                    "SELECT count(*) FROM deliveries WHERE delivery_id = ANY(%(ids)s)",
                    {"ids": ids},
                ).fetchone()
                if (
                    row is not None
                    and row[0] == len(ids)
                    and client.llen(DELIVERY_QUEUE) == 0
                    and client.llen(PARKED_QUEUE) == 0
                ):
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"not settled after {timeout:.0f} s: see {self.workdir}")
                time.sleep(0.1)
        client.close()

    def lags(self, prefix: str) -> list[tuple[str, float, float]]:
        """(event id, first received, processed) as epoch seconds, per event of the run."""
        with psycopg.connect(self.postgres.url()) as conn:
            rows = conn.execute(
                "SELECT e.event_id, extract(epoch FROM min(d.received_at))::float8,"
                " extract(epoch FROM e.processed_at)::float8"
                " FROM events e JOIN deliveries d USING (event_id)"
                " WHERE e.event_id LIKE %(like)s AND e.processed_at IS NOT NULL"
                " GROUP BY e.event_id, e.processed_at",
                {"like": f"ev_{prefix}_%"},
            ).fetchall()
        return [(str(e), float(r), float(p)) for e, r, p in rows]

    def drop_queue(self) -> None:
        client = redis.Redis.from_url(self.broker.url())
        client.delete(DELIVERY_QUEUE)
        client.close()

    def outcomes(self) -> dict[str, int]:
        with psycopg.connect(self.postgres.url()) as conn:
            return {
                str(k): int(v)
                for k, v in conn.execute(
                    "SELECT status, count(*) FROM events WHERE event_id LIKE 'ev_load_%' GROUP BY 1"
                ).fetchall()
            }


def peak_rss(label: str, proc: subprocess.Popen[bytes] | int) -> list[tuple[str, float]]:
    """VmHWM in MB of a process and of its children, named ``label``, ``label child N``."""
    pid = proc if isinstance(proc, int) else proc.pid
    try:
        parent = psutil.Process(pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    peaks = []
    for i, p in enumerate(family):
        try:
            with open(f"/proc/{p.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        name = label if i == 0 else f"{label} child {i}"
                        peaks.append((name, int(line.split()[1]) / 1024))
        except OSError:
            continue
    return peaks


def send_and_settle(
    bench: Bench, label: str, warm: Stream, stream: Stream, port: int, settle: bool
) -> SendRun:
    warm_run = bench.send(f"{label} warm-up", warm, port)
    if settle:
        ids = [a.delivery_id for a in warm_run.sender.accepted().values() if a.delivery_id]
        bench.wait_settled(ids, timeout=120)
    return bench.send(label, stream, port)


def write_records(run: SendRun, lags: list[tuple[str, float, float]]) -> Records:
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deliveries", type=int, default=None, help="default 20000")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="a short run (2000 deliveries)")
    parser.add_argument("--web-concurrency", type=int, default=2)
    parser.add_argument("--worker-concurrency", type=int, default=2)
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args()
    n = args.deliveries or (2000 if args.quick else 20_000)

    print(f"building {n} deliveries ...", flush=True)
    stream = build_stream(n, seed=11, prefix="load")
    warm = build_stream(max(200, args.concurrency * 10), seed=12, prefix="warm")
    workdir = Path(tempfile.mkdtemp(prefix="vfy-bench-load-"))
    bench = Bench(args, workdir)
    problems: list[str] = []
    try:
        bench.start_servers()
        worker = bench.worker()
        web, port = bench.web(APPS["ours"])
        print("sending to the pipeline ...", flush=True)
        ours = send_and_settle(bench, "ours", warm, stream, port, settle=True)
        last_202 = ours.sender.started_wall + max(
            a.sent_at + a.ack_ms / 1000 for a in ours.sender.attempts
        )
        ids = [a.delivery_id for a in ours.sender.accepted().values() if a.delivery_id]
        bench.wait_settled(ids, timeout=n / 20 + 300)
        lags = bench.lags("load")
        outcomes = bench.outcomes()
        drain = max(p for _, _, p in lags) - last_202
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
        problems += ours.problems() + alone.problems() + bare.problems()
        expected_events = len(stream.event_ids)
        if outcomes != {"processed": expected_events}:
            problems.append(f"events: {outcomes}, expected {expected_events} processed")
    finally:
        bench.stop_all()

    lag_ms = [(p - r) * 1000 for _, r, p in lags]
    report(args, n, stream, (ours, alone, bare), lag_ms, drain)
    if not args.no_plots:
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
    if problems:
        print("\nFAILED CHECKS:\n  " + "\n  ".join(problems) + f"\n(servers' data: {workdir})")
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


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
