"""Worker drain rate: how fast a worker applies a queue of real events, against a no-op.

    .venv/bin/python -m bench.worker_drain [--events 10000] [--concurrency 2] [--rounds 3]
        [--batch-size 100] [--unbatched] [--py-spy DIR]

Starts its own PostgreSQL (fsync on) and Redis (AOF everysec), fills the queue with N
signed-fixture deliveries (gift and loyalty card redemptions and rollbacks, 10 % of them
duplicates), starts ``celery worker`` as the Procfile does, and times the drain from the
first message taken to the last event recorded. In the same run, the same worker
configuration (same ``WORKER_BATCH_SIZE``, hence the same prefetch) drains N no-op tasks
of the same size. Each of ``--rounds`` rounds drains both (the database emptied between
rounds); ``--unbatched`` adds a drain with ``WORKER_BATCH_SIZE=1`` (one task and one
transaction per delivery, as before issue 12) to each round. Prints the medians: events/s,
the ratio to the no-op rate, the CPU per event of the worker (main process and pool
children) and of PostgreSQL (every server process), and the peak RSS of every worker
process (the largest over the rounds). ``--py-spy DIR`` samples every drain's worker
(main process and pool children) with py-spy into ``DIR/<drain>-<round>.txt``, collapsed
stacks, one line per stack with its sample count (``--nonblocking``: the process is not
paused, so the figures stay close to an unprofiled run's).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil
import psycopg
import redis

from bench.common import (
    ROOT,
    celery_worker_command,
    embedded_stores,
    peak_rss_mb,
    start_stores,
    stores_env,
)
from devtools.servers import EmbeddedPostgres, EmbeddedRedis
from devtools.webhooks import body_of, card_redemption, card_rollback, envelope
from workers.queue import DELIVERY_QUEUE, Message, celery_message


@dataclass(frozen=True)
class Drained:
    seconds: float
    rss: list[float]
    """Peak RSS in MB of each worker process."""
    worker_cpu: float
    """CPU seconds of the worker (main process and pool children) during the drain."""
    main_cpu: float
    """CPU seconds of the worker's main process (the consumer) alone."""
    postgres_cpu: float
    """CPU seconds of every PostgreSQL process during the drain."""


def build_bodies(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    unique = int(n * 0.9)
    bodies: list[str] = []
    for i in range(unique):
        # Pairs of events (a redemption and its rollback) on one card and one order, each
        # pair with its own card, order and customer, as in a real stream.
        pair = i // 2
        kind = "gift" if pair % 2 else "loyalty"
        ids = {
            "order_id": f"ord_bench_{pair}",
            "customer_id": f"cust_bench_{pair % 997}",
            "voucher_id": f"v_bench_{pair}",
        }
        rid = f"r_bench_{pair}"
        if i % 2 == 0:
            data = card_redemption(kind, rid, amount=100 + pair, balance_after=10_000, **ids)
            doc = envelope("redemption.succeeded", data, event_id=f"ev_bench_{i}")
        else:
            data = card_rollback(
                kind, rid, f"rr_{pair}", amount=100 + pair, balance_after=10_000, **ids
            )
            doc = envelope("redemption.rollback.succeeded", data, event_id=f"ev_bench_{i}")
        bodies.append(body_of(doc).decode())
    bodies += [rng.choice(bodies[:unique]) for _ in range(n - unique)]  # duplicates
    rng.shuffle(bodies)
    return bodies


def fill(client: redis.Redis, messages: list[bytes]) -> None:
    pipe = client.pipeline(transaction=False)
    for i, message in enumerate(messages, 1):
        pipe.lpush(DELIVERY_QUEUE, message)
        if i % 1000 == 0:
            pipe.execute()
    pipe.execute()


def start_worker(
    app: str, env: dict[str, str], concurrency: int, log: Path
) -> subprocess.Popen[bytes]:
    args = celery_worker_command(app, DELIVERY_QUEUE, concurrency, "WARNING")
    with log.open("wb") as out:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def cpu_seconds(pid: int, children: bool = True) -> float:
    """User + system CPU seconds of a process and (``children``) of its live children."""
    total = 0.0
    parent = psutil.Process(pid)
    for p in [parent, *(parent.children(recursive=True) if children else [])]:
        try:
            times = p.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def drain(
    name: str,
    app: str,
    messages: list[bytes],
    env: dict[str, str],
    client: redis.Redis,
    concurrency: int,
    done: Callable[[], bool],
    workdir: Path,
    postgres_pid: int,
    profile: Path | None = None,
) -> Drained:
    client.flushdb()
    fill(client, messages)
    n = len(messages)
    proc = start_worker(app, env, concurrency, workdir / f"{name}.log")
    try:
        while client.llen(DELIVERY_QUEUE) >= n:  # type: ignore[operator]
            if proc.poll() is not None:
                raise SystemExit(f"{name} worker exited: see {workdir / (name + '.log')}")
            time.sleep(0.005)
        sampler = None if profile is None else start_py_spy(proc.pid, profile)
        started = time.perf_counter()
        worker_before, pg_before = cpu_seconds(proc.pid), cpu_seconds(postgres_pid)
        main_before = cpu_seconds(proc.pid, children=False)
        while not done():
            if proc.poll() is not None:
                raise SystemExit(f"{name} worker exited: see {workdir / (name + '.log')}")
            time.sleep(0.02)
        elapsed = time.perf_counter() - started
        worker_cpu = cpu_seconds(proc.pid) - worker_before
        pg_cpu = cpu_seconds(postgres_pid) - pg_before
        main_cpu = cpu_seconds(proc.pid, children=False) - main_before
        rss = [mb for _, mb in peak_rss_mb(proc.pid)]
        if sampler is not None:
            sampler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            sampler.wait(timeout=30)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return Drained(elapsed, rss, worker_cpu, main_cpu, pg_cpu)


def start_py_spy(pid: int, output: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling ``pid`` and its children until SIGINT, collapsed stacks to ``output``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    args = ["py-spy", "record", "--pid", str(pid), "--subprocesses", "--nonblocking"]
    args += ["--rate", "250", "--format", "raw", "--output", str(output)]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=100, help="WORKER_BATCH_SIZE")
    parser.add_argument(
        "--unbatched", action="store_true", help="also drain with WORKER_BATCH_SIZE=1"
    )
    parser.add_argument(
        "--py-spy", type=Path, default=None, metavar="DIR", help="sample each drain with py-spy"
    )
    return parser.parse_args()


def build_messages(bodies: list[str]) -> tuple[list[bytes], list[bytes]]:
    """The deliveries of ``bodies`` as the receiver queues them, and as no-op tasks."""
    now = datetime.now(UTC).isoformat()
    event_messages = [Message(b, uuid.uuid4().hex, now).encode() for b in bodies]
    noop_messages = [
        celery_message(
            "bench.noop",
            {"body": b, "delivery_id": uuid.uuid4().hex, "received_at": now},
            DELIVERY_QUEUE,
        )
        for b in bodies
    ]
    return event_messages, noop_messages


Round = dict[str, Drained]
"""One round: ``noop``, ``events`` and (``--unbatched``) ``unbatched``."""


def postmaster_pid(postgres: EmbeddedPostgres) -> int:
    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return psutil.Process(row[0]).ppid()


def run(
    args: argparse.Namespace, postgres: EmbeddedPostgres, broker: EmbeddedRedis, workdir: Path
) -> tuple[list[Round], dict[str, int]]:
    """``args.rounds`` rounds of drains; the deliveries' outcomes of the last one."""
    n = args.events
    client = redis.Redis.from_url(broker.url())
    batched = stores_env(
        postgres, broker, LOG_LEVEL="WARNING", WORKER_BATCH_SIZE=str(args.batch_size)
    )
    unbatched = {**batched, "WORKER_BATCH_SIZE": "1"}
    event_messages, noop_messages = build_messages(build_bodies(n))
    pg_pid = postmaster_pid(postgres)

    def queue_empty() -> bool:
        return client.llen(DELIVERY_QUEUE) == 0 and client.hlen("unacked") == 0  # type: ignore[return-value]

    poll = psycopg.connect(postgres.url(), autocommit=True)  # one connection, reused

    def all_recorded() -> bool:
        row = poll.execute("SELECT count(*) FROM deliveries").fetchone()
        return row is not None and row[0] >= n

    def empty_database() -> None:
        poll.execute(
            "TRUNCATE events, deliveries, dead_letters, orders, redemptions, ledger_entries,"
            " card_balances, flags RESTART IDENTITY CASCADE"
        )

    rounds: list[Round] = []
    statuses: dict[str, int] = {}
    for number in range(1, args.rounds + 1):
        measured: Round = {}
        common = (client, args.concurrency)

        def sampled(name: str, number: int = number) -> Path | None:
            return None if args.py_spy is None else args.py_spy / f"{name}-{number}.txt"

        measured["noop"] = drain(
            "noop", "bench.noop_app", noop_messages, batched, *common, queue_empty, workdir,
            pg_pid, sampled("noop"),
        )  # fmt: skip
        empty_database()
        measured["events"] = drain(
            "events", "workers.app", event_messages, batched, *common, all_recorded, workdir,
            pg_pid, sampled("events"),
        )  # fmt: skip
        statuses = dict(
            poll.execute("SELECT outcome, count(*) FROM deliveries GROUP BY 1").fetchall()
        )
        if args.unbatched:
            empty_database()
            measured["unbatched"] = drain(
                "unbatched", "workers.app", event_messages, unbatched, *common, all_recorded,
                workdir, pg_pid, sampled("unbatched"),
            )  # fmt: skip
        rounds.append(measured)
    poll.close()
    client.close()
    return rounds, statuses


def report(args: argparse.Namespace, rounds: list[Round], statuses: dict[str, int]) -> None:
    n = args.events
    print(
        f"worker drain, N={n} deliveries (10 % duplicates), prefork concurrency "
        f"{args.concurrency}, WORKER_BATCH_SIZE={args.batch_size}, medians of {len(rounds)} rounds"
    )
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"{'run':<10}{'seconds':>9}{'per second':>12}{'worker ms/ev':>14}{'of it main':>12}"
        f"{'pg ms/ev':>10}"
        "   peak RSS MB per process"
    )
    rates: dict[str, float] = {}
    for name in rounds[0]:
        drained = [r[name] for r in rounds]
        secs = statistics.median(d.seconds for d in drained)
        rates[name] = n / secs
        worker_ms = statistics.median(d.worker_cpu for d in drained) / n * 1000
        pg_ms = statistics.median(d.postgres_cpu for d in drained) / n * 1000
        main_ms = statistics.median(d.main_cpu for d in drained) / n * 1000
        rss = [max(col) for col in zip(*(d.rss for d in drained), strict=False)]
        print(
            f"{name:<10}{secs:>9.2f}{rates[name]:>12.0f}{worker_ms:>14.2f}{main_ms:>12.2f}"
            f"{pg_ms:>10.2f}   " + ", ".join(f"{m:.0f}" for m in rss)
        )
    print(f"ratio events/no-op: {rates['events'] / rates['noop']:.2f}x (target >= 1.0x)")
    if "unbatched" in rates:
        print(f"ratio events/unbatched: {rates['events'] / rates['unbatched']:.2f}x")
    per_round = ", ".join(f"{n / r['events'].seconds:.0f}" for r in rounds)
    print(f"per-round events/s: {per_round}")
    print(f"delivery outcomes (last round): {statuses}")


def main() -> None:
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="vfy-bench-drain-"))
    postgres, broker = embedded_stores(workdir, durable=True)
    try:
        start_stores(postgres, broker)
        rounds, statuses = run(args, postgres, broker, workdir)
    finally:
        broker.stop()
        postgres.stop()
    report(args, rounds, statuses)


if __name__ == "__main__":
    main()
