"""Worker drain rate: how fast a worker applies a queue of real events, against a no-op.

    .venv/bin/python -m bench.worker_drain [--events 10000] [--concurrency 2]

Starts its own PostgreSQL (fsync on) and Redis (AOF everysec), fills the queue with N
signed-fixture deliveries (gift and loyalty card redemptions and rollbacks, 10 % of them
duplicates), starts ``celery worker`` as the Procfile does, and times the drain from the
first message taken to the last event recorded. In the same run, the same worker
configuration drains N no-op tasks of the same size. Prints events/s, the ratio to the
no-op rate and the peak RSS of every worker process.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psutil
import psycopg
import redis

from config.local_servers import EmbeddedPostgres, EmbeddedRedis
from migrations import apply_migrations
from tests.support import body_of, card_redemption, card_rollback, envelope
from workers.messages import DELIVERY_QUEUE, celery_message, delivery_message

ROOT = Path(__file__).resolve().parent.parent


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
    args = [
        sys.executable, "-m", "celery", "-A", app, "worker", "--queues", DELIVERY_QUEUE,
        "--concurrency", str(concurrency), "--without-gossip", "--without-mingle",
        "--without-heartbeat", "--loglevel", "WARNING",
    ]  # fmt: skip
    with log.open("wb") as out:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def peak_rss_mb(proc: subprocess.Popen[bytes]) -> list[float]:
    parent = psutil.Process(proc.pid)
    peaks = []
    for p in [parent, *parent.children(recursive=True)]:
        try:
            with open(f"/proc/{p.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        peaks.append(int(line.split()[1]) / 1024)
        except OSError:
            continue
    return peaks


def drain(
    name: str,
    app: str,
    messages: list[bytes],
    env: dict[str, str],
    client: redis.Redis,
    concurrency: int,
    done: object,
    workdir: Path,
) -> tuple[float, list[float]]:
    client.flushdb()
    fill(client, messages)
    n = len(messages)
    proc = start_worker(app, env, concurrency, workdir / f"{name}.log")
    try:
        while client.llen(DELIVERY_QUEUE) >= n:  # type: ignore[operator]
            if proc.poll() is not None:
                raise SystemExit(f"{name} worker exited: see {workdir / (name + '.log')}")
            time.sleep(0.005)
        started = time.perf_counter()
        while not done():  # type: ignore[operator]
            if proc.poll() is not None:
                raise SystemExit(f"{name} worker exited: see {workdir / (name + '.log')}")
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        rss = peak_rss_mb(proc)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return elapsed, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    n = args.events

    workdir = Path(tempfile.mkdtemp(prefix="vfy-bench-drain-"))
    postgres = EmbeddedPostgres(workdir / "pg", durable=True)
    broker = EmbeddedRedis(workdir / "redis", appendfsync="everysec")
    postgres.start()
    broker.start()
    try:
        with psycopg.connect(postgres.url(), autocommit=True) as conn:
            apply_migrations(conn)
        client = redis.Redis.from_url(broker.url())
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "DATABASE_URL": postgres.url(),
            "REDIS_URL": broker.url(),
            "LOG_LEVEL": "WARNING",
        }
        bodies = build_bodies(n)
        now = datetime.now(UTC).isoformat()
        event_messages = [delivery_message(b, uuid.uuid4().hex, now) for b in bodies]
        noop_messages = [
            celery_message(
                "bench.noop",
                {"body": b, "delivery_id": uuid.uuid4().hex, "received_at": now},
                DELIVERY_QUEUE,
            )
            for b in bodies
        ]

        def queue_empty() -> bool:
            return client.llen(DELIVERY_QUEUE) == 0 and client.hlen("unacked") == 0  # type: ignore[return-value]

        poll = psycopg.connect(postgres.url(), autocommit=True)  # one connection, reused

        def all_recorded() -> bool:
            row = poll.execute("SELECT count(*) FROM deliveries").fetchone()
            return row is not None and row[0] >= n

        noop_s, noop_rss = drain(
            "noop",
            "bench.noop_app",
            noop_messages,
            env,
            client,
            args.concurrency,
            queue_empty,
            workdir,
        )
        events_s, events_rss = drain(
            "events",
            "workers.app",
            event_messages,
            env,
            client,
            args.concurrency,
            all_recorded,
            workdir,
        )
        poll.close()
        with psycopg.connect(postgres.url()) as conn:
            statuses = dict(
                conn.execute("SELECT outcome, count(*) FROM deliveries GROUP BY 1").fetchall()
            )
        client.close()
    finally:
        broker.stop()
        postgres.stop()

    noop_rate, events_rate = n / noop_s, n / events_s
    print(
        f"worker drain, N={n} deliveries (10 % duplicates), prefork concurrency {args.concurrency}"
    )
    print(f"{'run':<8}{'seconds':>10}{'per second':>12}   peak RSS MB per process")
    for name, secs, rate, rss in (
        ("no-op", noop_s, noop_rate, noop_rss),
        ("events", events_s, events_rate, events_rss),
    ):
        print(f"{name:<8}{secs:>10.2f}{rate:>12.0f}   {', '.join(f'{m:.0f}' for m in rss)}")
    print(f"ratio events/no-op: {events_rate / noop_rate:.0%} (target >= 70 %)")
    print(f"delivery outcomes: {statuses}")


if __name__ == "__main__":
    main()
