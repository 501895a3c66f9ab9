"""Receiver throughput and latency, against a bare Flask app under the same gunicorn.

    .venv/bin/python -m bench.receiver [--quick] [--requests N | --duration SECONDS]
        [--concurrency 50] [--rate 500] [--classes sync,gthread] [--rounds 1]

Starts its own Redis (AOF, appendfsync everysec: what production runs), then for each
gunicorn worker class (WEB_CONCURRENCY=2; gthread with WEB_THREADS threads) serves in turn
``receiver.wsgi:app`` (ours) and ``bench.bare_app:app`` (a Flask view that only answers
202) with ``config/gunicorn.py``, and drives each with ``hey`` and a signed 6 KB webhook
(the published redemption.succeeded data in a v2024-01-01 envelope, padded with order
metadata). Three loads per app:

- ``c=50``: 50 concurrent senders, each sending its next request as soon as it has an
  answer (closed loop). Gives req/s, and latency at saturation.
- ``500/s hey -q``: the same 50 senders limited to 10 req/s each (``hey -c 50 -q 10``).
  hey starts the 50 rate tickers together, so the requests come in bursts of 50 every
  100 ms: the p99 is the time to drain a burst, not that of a steady 500 req/s.
- ``500/s smooth``: 25 ``hey -c 1 -q 20`` processes started 2 ms apart, for a steady
  500 req/s (one request every 2 ms). The issue's p99 target is judged on this one.

Every run is checked: all answers must be 202, and for ours the Redis list must then hold
exactly as many messages as there were 202s (then it is emptied). The webhook path never
touches PostgreSQL, so DATABASE_URL points at a port nothing listens on (/readyz is not
called). Needs ``hey`` (Debian/Ubuntu: ``apt-get install -y hey``). The machine is shared:
the load average is printed before and after; ``--rounds`` repeats and takes medians.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from config.local_servers import EmbeddedRedis, free_port, wait_for_port
from tests.support import SECRET, body_of, envelope, fixture, sign
from workers.messages import ACCEPTED_HASH, ACCEPTED_INDEX, DELIVERY_QUEUE

ROOT = Path(__file__).resolve().parent.parent
APPS = {"ours": "receiver.wsgi:app", "bare": "bench.bare_app:app"}
CLOSED, BURSTS, SMOOTH = "c=50", "hey -q", "smooth"
TARGET_THROUGHPUT_RATIO = 0.80
TARGET_P99_RATIO = 1.25
TARGET_P99_AT_RATE_MS = 15.0


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    codes: dict[int, int]
    errors: list[str] = field(default_factory=list)
    queued: int | None = None
    copies: int | None = None
    """Copies in the accepted set (one per 202: no worker runs here to forget them)."""
    web_cpu_us: float = 0.0
    """CPU time (user + system) of gunicorn's processes per answered request."""
    redis_cpu_us: float = 0.0

    @property
    def accepted(self) -> int:
        return self.codes.get(202, 0)

    def problems(self, label: str, expected: int | None) -> list[str]:
        found = []
        if set(self.codes) != {202} or self.errors:
            found.append(f"{label}: answers {self.codes}, errors {self.errors[:3]}")
        if expected is not None and self.accepted != expected:
            found.append(f"{label}: {self.accepted} answered 202 of {expected} sent")
        if self.queued is not None and self.queued != self.accepted:
            found.append(f"{label}: {self.accepted} answered 202, {self.queued} in Redis")
        if self.copies is not None and self.copies != self.accepted:
            found.append(f"{label}: {self.accepted} answered 202, {self.copies} accepted copies")
        return found


def check_hey() -> None:
    if shutil.which("hey") is None:
        sys.exit(
            "bench.receiver: the load generator 'hey' is not installed.\n"
            "  Debian/Ubuntu: apt-get update && apt-get install -y hey\n"
            "  elsewhere:     go install github.com/rakyll/hey@latest"
        )


def parse_summary(output: str) -> Run:
    """hey's default summary output."""

    def number(pattern: str) -> float:
        match = re.search(pattern, output)
        if match is None:
            raise RuntimeError(f"cannot read {pattern!r} in hey's output:\n{output}")
        return float(match.group(1))

    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", output)}
    errors = []
    if "Error distribution:" in output:
        tail = output.split("Error distribution:", 1)[1]
        errors = [line.strip() for line in tail.splitlines() if line.strip()]
    return Run(
        rps=number(r"Requests/sec:\s+([\d.]+)"),
        p50_ms=number(r"50% in ([\d.]+) secs") * 1000,
        p99_ms=number(r"99% in ([\d.]+) secs") * 1000,
        codes=codes,
        errors=errors,
    )


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile, as hey computes its own."""
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live children (Linux /proc).

    Throughput on a shared 2-core machine moves with whatever else runs; the CPU each
    request costs the web processes barely does, so it is reported beside it."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for each in [pid, *(int(c) for c in children.read_text().split())]:
        fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def webhook_body(size: int) -> bytes:
    """The published redemption.succeeded data in an envelope, compact as Voucherify sends
    it (4.2 KB), padded to ``size`` bytes with order metadata, as a merchant's would be."""
    data = fixture("redemption.succeeded")
    body = body_of(envelope("redemption.succeeded", data))
    if size > len(body):
        data["order"]["metadata"] = {"note": ""}
        padding = size - len(body_of(envelope("redemption.succeeded", data)))
        data["order"]["metadata"]["note"] = "x" * max(0, padding)
        body = body_of(envelope("redemption.succeeded", data))
    return body


class Bench:
    def __init__(
        self, args: argparse.Namespace, workdir: Path, redis_url: str, redis_pid: int
    ) -> None:
        self.args = args
        self.redis_pid = redis_pid
        self.workdir = workdir
        self.redis_url = redis_url
        self.redis = redis.Redis.from_url(redis_url)
        body = webhook_body(args.body_bytes)
        self.body_file = workdir / "body.json"
        self.body_file.write_bytes(body)
        self.body_size = len(body)
        self.signature = sign(body, SECRET)
        self.commands: dict[str, str] = {}

    def hey_args(self, load: list[str], url: str) -> list[str]:
        return [
            "hey", *load, "-m", "POST", "-T", "application/json",
            "-H", f"x-voucherify-signature: {self.signature}", "-D", str(self.body_file), url,
        ]  # fmt: skip

    def remember(self, mode: str, args: list[str]) -> None:
        text = " ".join(args).replace(self.signature, "<hex>")
        text = re.sub(r"http://127\.0\.0\.1:\d+", "http://127.0.0.1:$PORT", text)
        self.commands.setdefault(mode, text.replace(str(self.body_file), "body.json"))

    def closed_loop(self, url: str) -> Run:
        load = (
            ["-z", f"{self.args.duration}s"]
            if self.args.duration
            else ["-n", str(self.args.requests)]
        )
        args = self.hey_args([*load, "-c", str(self.args.concurrency)], url)
        self.remember(CLOSED, args)
        return parse_summary(
            subprocess.run(args, capture_output=True, text=True, check=True).stdout
        )

    def bursts(self, url: str) -> Run:
        per_sender = self.args.rate / self.args.concurrency
        total = self.args.rate * self.args.rate_seconds
        load = ["-n", str(total), "-c", str(self.args.concurrency), "-q", f"{per_sender:g}"]
        args = self.hey_args(load, url)
        self.remember(BURSTS, args)
        return parse_summary(
            subprocess.run(args, capture_output=True, text=True, check=True).stdout
        )

    def smooth(self, url: str) -> Run:
        senders = self.args.smooth_senders
        per_sender = self.args.rate / senders
        count = int(per_sender * self.args.rate_seconds)
        args = self.hey_args(
            ["-n", str(count), "-c", "1", "-q", f"{per_sender:g}", "-o", "csv"], url
        )
        self.remember(SMOOTH, [f"{senders} x", *args])
        spacing = 1 / self.args.rate  # sender i starts i/rate seconds after the first
        outputs = [self.workdir / f"smooth-{i}.csv" for i in range(senders)]
        procs = []
        started = time.monotonic()
        for i, path in enumerate(outputs):
            wait = started + i * spacing - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with path.open("wb") as out:
                procs.append(subprocess.Popen(args, stdout=out, stderr=subprocess.DEVNULL))
        for proc in procs:
            if proc.wait() != 0:
                raise RuntimeError(f"hey exited with {proc.returncode}")
        elapsed = time.monotonic() - started
        latencies: list[float] = []
        codes: dict[int, int] = {}
        for path in outputs:
            with path.open() as handle:
                for row in csv.DictReader(handle):
                    latencies.append(float(row["response-time"]) * 1000)
                    code = int(row["status-code"])
                    codes[code] = codes.get(code, 0) + 1
            path.unlink()
        latencies.sort()
        missing = senders * count - len(latencies)  # hey's csv lists answered requests only
        return Run(
            rps=len(latencies) / elapsed,
            p50_ms=percentile(latencies, 0.50),
            p99_ms=percentile(latencies, 0.99),
            codes=codes,
            errors=[f"{missing} requests without an answer"] if missing else [],
        )

    def serve(self, app: str, worker_class: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        metrics_dir = self.workdir / f"metrics-{port}"
        metrics_dir.mkdir()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_"))},
            "PYTHONPATH": str(ROOT),
            "PORT": str(port),
            "WEB_CONCURRENCY": "2",
            "WEB_WORKER_CLASS": worker_class,
            # gunicorn turns "sync" into gthread when threads > 1 (config/gunicorn.py's
            # default is 8): one thread, or the sync figures would be gthread's.
            "WEB_THREADS": "1" if worker_class == "sync" else str(self.args.threads),
            "REDIS_URL": self.redis_url,
            # Never contacted by the webhook path; a valid DSN, so start-up accepts it.
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/unused",
            "VOUCHERIFY_WEBHOOK_SECRET": SECRET,
            "LOG_LEVEL": "WARNING",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        }
        args = [sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.py", app]
        with log.open("wb") as out:
            proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_for_port(port, timeout=30)
        return proc, f"http://127.0.0.1:{port}/webhooks/voucherify"

    def measure(self, name: str, worker_class: str) -> tuple[dict[str, Run], list[str]]:
        log = self.workdir / f"gunicorn-{worker_class}-{name}.log"
        proc, url = self.serve(APPS[name], worker_class, log)
        runs: dict[str, Run] = {}
        problems: list[str] = []
        try:
            # Warm-up, not measured: workers booted, imports done, connections open.
            warmup = self.hey_args(["-n", "500", "-c", str(self.args.concurrency)], url)
            subprocess.run(warmup, capture_output=True, check=True)
            self.redis.delete(DELIVERY_QUEUE, ACCEPTED_HASH, ACCEPTED_INDEX)
            expected = {
                CLOSED: None if self.args.duration else self.args.requests,
                BURSTS: self.args.rate * self.args.rate_seconds,
                SMOOTH: None,  # checked in smooth(): every request answered
            }
            for mode, drive in (
                (CLOSED, self.closed_loop),
                (BURSTS, self.bursts),
                (SMOOTH, self.smooth),
            ):
                web_cpu, redis_cpu = cpu_seconds(proc.pid), cpu_seconds(self.redis_pid)
                run = drive(url)
                answered = max(1, sum(run.codes.values()))
                run.web_cpu_us = (cpu_seconds(proc.pid) - web_cpu) / answered * 1e6
                run.redis_cpu_us = (cpu_seconds(self.redis_pid) - redis_cpu) / answered * 1e6
                if name == "ours":
                    run.queued = int(self.redis.llen(DELIVERY_QUEUE))
                    run.copies = int(self.redis.hlen(ACCEPTED_HASH))
                    self.redis.delete(DELIVERY_QUEUE, ACCEPTED_HASH, ACCEPTED_INDEX)
                runs[mode] = run
                problems += run.problems(f"{worker_class} {name} {mode}", expected[mode])
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            problems.append(f"gunicorn {worker_class} {name} exited with {proc.returncode}: {log}")
        return runs, problems


def median_run(runs: list[Run]) -> Run:
    if len(runs) == 1:
        return runs[0]
    codes: dict[int, int] = {}
    for run in runs:
        for code, count in run.codes.items():
            codes[code] = codes.get(code, 0) + count
    return Run(
        rps=statistics.median(r.rps for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        codes=codes,
        queued=None if runs[0].queued is None else sum(r.queued or 0 for r in runs),
        web_cpu_us=statistics.median(r.web_cpu_us for r in runs),
        redis_cpu_us=statistics.median(r.redis_cpu_us for r in runs),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (3000 requests, 4 s)")
    parser.add_argument("--requests", type=int, default=None, help="requests per c=50 run")
    parser.add_argument("--duration", type=int, default=None, help="seconds per c=50 run")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rate", type=int, default=500, help="offered req/s of the rate runs")
    parser.add_argument("--rate-seconds", type=int, default=None, help="length of a rate run")
    parser.add_argument("--smooth-senders", type=int, default=25, help="hey processes")
    parser.add_argument("--threads", type=int, default=8, help="WEB_THREADS for gthread")
    parser.add_argument("--classes", default="sync,gthread", help="gunicorn worker classes")
    parser.add_argument("--rounds", type=int, default=1, help="repeat all, report medians")
    parser.add_argument("--body-bytes", type=int, default=6144, help="pad the body to this")
    args = parser.parse_args()
    if args.requests is None:
        args.requests = 3000 if args.quick else 20000
    if args.rate_seconds is None:
        args.rate_seconds = 4 if args.quick else 10
    check_hey()

    load_before = os.getloadavg()
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="vfy-bench-receiver-"))
    server = EmbeddedRedis(workdir / "redis", appendfsync="everysec")
    redis_url = server.start()
    assert server.process is not None
    bench = Bench(args, workdir, redis_url, server.process.pid)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    results: dict[tuple[str, str, str], list[Run]] = {}
    problems: list[str] = []
    try:
        for _ in range(args.rounds):
            for worker_class in classes:
                for name in APPS:
                    runs, found = bench.measure(name, worker_class)
                    problems += found
                    for mode, run in runs.items():
                        results.setdefault((worker_class, name, mode), []).append(run)
    finally:
        bench.redis.close()
        server.stop()

    report(args, bench, classes, results, load_before, time.monotonic() - started)
    if problems:
        print("\nFAILED CHECKS (logs kept in " + str(workdir) + "):\n  " + "\n  ".join(problems))
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def report(
    args: argparse.Namespace,
    bench: Bench,
    classes: list[str],
    results: dict[tuple[str, str, str], list[Run]],
    load_before: tuple[float, float, float],
    elapsed: float,
) -> None:
    load = f"{args.duration} s" if args.duration else f"{args.requests} requests"
    print(
        f"\nReceiver benchmark: {os.cpu_count()} CPUs; body {bench.body_size} bytes; gunicorn "
        f"WEB_CONCURRENCY=2 (gthread: WEB_THREADS={args.threads}); Redis AOF everysec; "
        f"c=50: {load}; rate runs: {args.rate}/s for {args.rate_seconds} s; "
        f"{args.rounds} round(s), medians"
    )
    print(
        "load average 1/5/15 min: before {:.2f} {:.2f} {:.2f}, after {:.2f} {:.2f} {:.2f}; "
        "{:.0f} s".format(*load_before, *os.getloadavg(), elapsed)
    )
    print("hey commands:")
    for mode, command in bench.commands.items():
        print(f"  {mode:<7} {command}")
    header = (
        f"{'class':<8} {'app':<5} {'load':<14} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'202s':>7} {'queued':>7} {'web cpu':>8} {'redis':>6}"
    )
    print("\nweb cpu, redis: CPU time (us) of gunicorn's processes, of Redis, per answered request")
    print(header + "\n" + "-" * len(header))
    medians: dict[tuple[str, str, str], Run] = {}
    for worker_class in classes:
        for mode in (CLOSED, BURSTS, SMOOTH):
            for name in APPS:
                if (worker_class, name, mode) not in results:
                    continue
                run = medians[(worker_class, name, mode)] = median_run(
                    results[(worker_class, name, mode)]
                )
                shown = mode if mode == CLOSED else f"{args.rate}/s {mode}"
                queued = "-" if run.queued is None else str(run.queued)
                print(
                    f"{worker_class:<8} {name:<5} {shown:<14} {run.rps:>7.0f} {run.p50_ms:>7.2f} "
                    f"{run.p99_ms:>7.2f} {run.accepted:>7} {queued:>7} "
                    f"{run.web_cpu_us:>8.0f} {run.redis_cpu_us:>6.0f}"
                )
    print()
    for worker_class in classes:
        try:
            ours, bare = (
                medians[(worker_class, "ours", CLOSED)],
                medians[(worker_class, "bare", CLOSED)],
            )
            smooth = medians[(worker_class, "ours", SMOOTH)]
            bursts = medians[(worker_class, "ours", BURSTS)]
        except KeyError:
            continue
        throughput, p99 = ours.rps / bare.rps, ours.p99_ms / bare.p99_ms
        print(
            f"{worker_class:<8} c=50: throughput ours/bare {throughput:.2f} "
            f"[{verdict(throughput >= TARGET_THROUGHPUT_RATIO)} >= {TARGET_THROUGHPUT_RATIO}], "
            f"p99 ours/bare {p99:.2f} [{verdict(p99 <= TARGET_P99_RATIO)} <= {TARGET_P99_RATIO}]; "
            f"{args.rate}/s: our p99 smooth {smooth.p99_ms:.1f} ms "
            f"[{verdict(smooth.p99_ms <= TARGET_P99_AT_RATE_MS)} <= {TARGET_P99_AT_RATE_MS:g}], "
            f"in hey -q bursts {bursts.p99_ms:.1f} ms; web CPU per request ours/bare "
            f"{ours.web_cpu_us / bare.web_cpu_us:.2f} (+ Redis {ours.redis_cpu_us:.0f} us)"
        )


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


if __name__ == "__main__":
    sys.exit(main())
