"""Receiver throughput and latency, against a bare Flask app under the same gunicorn.

    .venv/bin/python -m bench.receiver [--quick] [--requests N | --duration SECONDS]
        [--concurrency 50] [--rate 500] [--classes sync,gthread] [--rounds 1]

Starts its own Redis (AOF, appendfsync everysec: what production runs), then for each
gunicorn worker class (WEB_CONCURRENCY=2; gthread with WEB_THREADS threads) serves in turn
``web.wsgi:app`` (ours) and ``bench.bare_app:app`` (a Flask view that only answers
202) with ``web/gunicorn.py``, and drives each with ``hey`` and a signed 6 KB webhook
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
exactly as many messages as there were 202s (then it is emptied). Before each app is
served, Redis is emptied and its AOF rewritten, so every round meets the same Redis. The
webhook path never touches PostgreSQL, so DATABASE_URL points at a port nothing listens on
(/readyz is not called). Needs ``hey`` (Debian/Ubuntu: ``apt-get install -y hey``). The
machine is shared: the load average is printed before and after; ``--rounds`` repeats and
takes medians, running the two apps in turn in alternating order (ours first, then bare
first, ...), and prints each round's ours/bare ratios beside the ratios of the medians:
the two apps of one round ran seconds apart, under nearly the same load from the machine's
other users.
CPU per answered request is printed for gunicorn's processes, Redis and hey.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench.common import APPS, ROOT, conclude, gunicorn_command
from bench.hey import Run, check_hey, csv_run, median_run, parse_summary
from devtools.servers import EmbeddedRedis, free_port, wait_for_port
from devtools.webhooks import SECRET, body_of, envelope, fixture, sign
from workers.queue import ACCEPTED_HASH, ACCEPTED_INDEX, DELIVERY_QUEUE

CLOSED, BURSTS, SMOOTH = "c=50", "hey -q", "smooth"
TARGET_THROUGHPUT_RATIO = 0.80
TARGET_P99_RATIO = 1.25
TARGET_P99_AT_RATE_MS = 15.0


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


def children_cpu_seconds() -> float:
    """User + system CPU time of this process's finished children (the hey processes)."""
    times = os.times()
    return times.children_user + times.children_system


def webhook_body(size: int) -> bytes:
    """The published redemption.succeeded data in an envelope, compact as Voucherify sends
    it (4.2 KB), padded to ``size`` bytes with order metadata, as a merchant's would be.

    Without the envelope's event ids: hey sends one body again and again, and the receiver
    pushes nothing for a repeat of an event id it accepted before (it answers with the
    first delivery's id). Without them every request is a first delivery, pushed as
    Voucherify's first try of each event is (what users send); the one thing left out is
    the event id's mark, a ``SET`` of about 50 bytes beside the two 7 KB writes."""
    data = fixture("redemption.succeeded")

    def body_with(data: dict[str, Any]) -> bytes:
        document = envelope("redemption.succeeded", data)
        document.pop("id", None)
        document.get("event", {}).pop("id", None)
        return body_of(document)

    body = body_with(data)
    if size > len(body):
        data["order"]["metadata"] = {"note": ""}
        padding = size - len(body_with(data))
        data["order"]["metadata"]["note"] = "x" * max(0, padding)
        body = body_with(data)
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

    def summary(self, mode: str, load: list[str], url: str) -> Run:
        """One hey process with ``load``; its summary as the run."""
        args = self.hey_args(load, url)
        self.remember(mode, args)
        return parse_summary(
            subprocess.run(args, capture_output=True, text=True, check=True).stdout
        )

    def closed_loop(self, url: str) -> Run:
        load = (
            ["-z", f"{self.args.duration}s"]
            if self.args.duration
            else ["-n", str(self.args.requests)]
        )
        return self.summary(CLOSED, [*load, "-c", str(self.args.concurrency)], url)

    def bursts(self, url: str) -> Run:
        per_sender = self.args.rate / self.args.concurrency
        total = self.args.rate * self.args.rate_seconds
        load = ["-n", str(total), "-c", str(self.args.concurrency), "-q", f"{per_sender:g}"]
        return self.summary(BURSTS, load, url)

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
        return csv_run(outputs, senders * count, time.monotonic() - started)

    def serve(self, app: str, worker_class: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        metrics_dir = self.workdir / f"metrics-{port}"
        metrics_dir.mkdir()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_"))},
            "PYTHONPATH": str(ROOT),
            "PORT": str(port),
            "WEB_CONCURRENCY": "2",
            # "gthread-plain": gunicorn's own gthread (-k below), without the buffering
            # main loop of compat/gunicorn_gthread.py, to measure what the buffering costs.
            "WEB_WORKER_CLASS": worker_class.removesuffix("-plain"),
            # gunicorn turns "sync" into gthread when threads > 1 (web/gunicorn.py's
            # default is 8): one thread, or the sync figures would be gthread's.
            "WEB_THREADS": "1" if worker_class == "sync" else str(self.args.threads),
            "REDIS_URL": self.redis_url,
            # Never contacted by the webhook path; a valid DSN, so start-up accepts it.
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/unused",
            "VOUCHERIFY_WEBHOOK_SECRET": SECRET,
            "LOG_LEVEL": "WARNING",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        }
        args = gunicorn_command(app)
        if worker_class == "gthread-plain":
            args += ["--worker-class", "gthread"]
        with log.open("wb") as out:
            proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_for_port(port, timeout=30)
        return proc, f"http://127.0.0.1:{port}/webhooks/voucherify"

    def empty_redis(self) -> None:
        """Every app and round starts from the same Redis: no keys, and an AOF rewritten to
        nothing (deleting keys leaves the AOF as long as every push made it)."""
        self.redis.flushdb()
        self.redis.bgrewriteaof()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = self.redis.info("persistence")
            if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
                return
            time.sleep(0.05)
        raise RuntimeError("Redis did not finish rewriting its AOF within 60 s")

    def measure(self, name: str, worker_class: str) -> tuple[dict[str, Run], list[str]]:
        log = self.workdir / f"gunicorn-{worker_class}-{name}.log"
        self.empty_redis()
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
                hey_cpu = children_cpu_seconds()
                run = drive(url)
                answered = max(1, sum(run.codes.values()))
                run.web_cpu_us = (cpu_seconds(proc.pid) - web_cpu) / answered * 1e6
                run.redis_cpu_us = (cpu_seconds(self.redis_pid) - redis_cpu) / answered * 1e6
                run.hey_cpu_us = (children_cpu_seconds() - hey_cpu) / answered * 1e6
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (3000 requests, 4 s)")
    parser.add_argument("--requests", type=int, default=None, help="requests per c=50 run")
    parser.add_argument("--duration", type=int, default=None, help="seconds per c=50 run")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rate", type=int, default=500, help="offered req/s of the rate runs")
    parser.add_argument("--rate-seconds", type=int, default=None, help="length of a rate run")
    parser.add_argument("--smooth-senders", type=int, default=25, help="hey processes")
    parser.add_argument("--threads", type=int, default=8, help="WEB_THREADS for gthread")
    parser.add_argument(
        "--classes",
        default="sync,gthread",
        help="gunicorn worker classes: sync, gthread (ours, buffering), gthread-plain",
    )
    parser.add_argument("--rounds", type=int, default=1, help="repeat all, report medians")
    parser.add_argument("--body-bytes", type=int, default=6144, help="pad the body to this")
    args = parser.parse_args()
    if args.requests is None:
        args.requests = 3000 if args.quick else 20000
    if args.rate_seconds is None:
        args.rate_seconds = 4 if args.quick else 10
    return args


Results = dict[tuple[str, str, str], list[Run]]
"""The runs of every round, by (worker class, app, load)."""


def run_rounds(bench: Bench, rounds: int, classes: list[str]) -> tuple[Results, list[str]]:
    results: Results = {}
    problems: list[str] = []
    for round_number in range(rounds):
        for worker_class in classes:
            names = list(APPS) if round_number % 2 == 0 else list(reversed(APPS))
            for name in names:
                runs, found = bench.measure(name, worker_class)
                problems += found
                for mode, run in runs.items():
                    results.setdefault((worker_class, name, mode), []).append(run)
    return results, problems


def main() -> int:
    args = parse_args()
    check_hey()

    load_before = os.getloadavg()
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="vfy-bench-receiver-"))
    server = EmbeddedRedis(workdir / "redis", appendfsync="everysec")
    redis_url = server.start()
    assert server.process is not None
    bench = Bench(args, workdir, redis_url, server.process.pid)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    try:
        results, problems = run_rounds(bench, args.rounds, classes)
    finally:
        bench.redis.close()
        server.stop()

    report(args, bench, classes, results, load_before, time.monotonic() - started)
    return conclude(problems, workdir, "\nFAILED CHECKS (logs kept in {workdir}):\n  {problems}")


def report(
    args: argparse.Namespace,
    bench: Bench,
    classes: list[str],
    results: Results,
    load_before: tuple[float, float, float],
    elapsed: float,
) -> None:
    report_setup(args, bench, load_before, elapsed)
    medians = report_table(args, classes, results)
    print()
    report_targets(args, classes, medians)
    report_rounds(classes, results)


def report_setup(
    args: argparse.Namespace,
    bench: Bench,
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


def report_table(
    args: argparse.Namespace, classes: list[str], results: Results
) -> dict[tuple[str, str, str], Run]:
    """Print the median of every (class, app, load) and return them."""
    header = (
        f"{'class':<8} {'app':<5} {'load':<14} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'202s':>7} {'queued':>7} {'web cpu':>8} {'redis':>6} {'hey':>5}"
    )
    print(
        "\nweb cpu, redis, hey: CPU time (us) of gunicorn's processes, of Redis, of the load "
        "generator, per answered request"
    )
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
                    f"{run.web_cpu_us:>8.0f} {run.redis_cpu_us:>6.0f} {run.hey_cpu_us:>5.0f}"
                )
    return medians


def report_targets(
    args: argparse.Namespace, classes: list[str], medians: dict[tuple[str, str, str], Run]
) -> None:
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


def report_rounds(classes: list[str], results: Results) -> None:
    """Each round's c=50 ratios (ours and bare of a round ran seconds apart)."""
    for worker_class in classes:
        ours = results.get((worker_class, "ours", CLOSED), [])
        bare = results.get((worker_class, "bare", CLOSED), [])
        if len(ours) < 2 or len(ours) != len(bare):
            continue
        throughput = [o.rps / b.rps for o, b in zip(ours, bare, strict=True)]
        p99 = [o.p99_ms / b.p99_ms for o, b in zip(ours, bare, strict=True)]
        print(
            f"{worker_class:<8} c=50 by round: throughput ours/bare {ratios(throughput)}; "
            f"p99 ours/bare {ratios(p99)}"
        )


def ratios(values: list[float]) -> str:
    return f"{' '.join(f'{v:.2f}' for v in values)} (median {statistics.median(values):.2f})"


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


if __name__ == "__main__":
    sys.exit(main())
