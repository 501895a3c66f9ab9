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
import random
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

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

Drained = tuple[float, list[float]]
"""Seconds to drain the queue, peak RSS in MB of each worker process."""


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


def drain(
    name: str,
    app: str,
    messages: list[bytes],
    env: dict[str, str],
    client: redis.Redis,
    concurrency: int,
    done: Callable[[], bool],
    workdir: Path,
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
        started = time.perf_counter()
        while not done():
            if proc.poll() is not None:
                raise SystemExit(f"{name} worker exited: see {workdir / (name + '.log')}")
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        rss = [mb for _, mb in peak_rss_mb(proc.pid)]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return elapsed, rss


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=2)
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


def run(
    n: int, concurrency: int, postgres: EmbeddedPostgres, broker: EmbeddedRedis, workdir: Path
) -> tuple[Drained, Drained, dict[str, int]]:
    """Drain N no-op tasks, then N deliveries; the deliveries' outcomes."""
    client = redis.Redis.from_url(broker.url())
    env = stores_env(postgres, broker, LOG_LEVEL="WARNING")
    event_messages, noop_messages = build_messages(build_bodies(n))

    def queue_empty() -> bool:
        return client.llen(DELIVERY_QUEUE) == 0 and client.hlen("unacked") == 0  # type: ignore[return-value]

    poll = psycopg.connect(postgres.url(), autocommit=True)  # one connection, reused

    def all_recorded() -> bool:
        row = poll.execute("SELECT count(*) FROM deliveries").fetchone()
        return row is not None and row[0] >= n

    noop = drain(
        "noop", "bench.noop_app", noop_messages, env, client, concurrency, queue_empty, workdir
    )
    events = drain(
        "events", "workers.app", event_messages, env, client, concurrency, all_recorded, workdir
    )
    poll.close()
    with psycopg.connect(postgres.url()) as conn:
        statuses: dict[str, int] = dict(
            conn.execute("SELECT outcome, count(*) FROM deliveries GROUP BY 1").fetchall()
        )
    client.close()
    return noop, events, statuses


def report(
    n: int, concurrency: int, noop: Drained, events: Drained, statuses: dict[str, int]
) -> None:
    (noop_s, noop_rss), (events_s, events_rss) = noop, events
    noop_rate, events_rate = n / noop_s, n / events_s
    print(f"worker drain, N={n} deliveries (10 % duplicates), prefork concurrency {concurrency}")
    print(f"{'run':<8}{'seconds':>10}{'per second':>12}   peak RSS MB per process")
    for name, secs, rate, rss in (
        ("no-op", noop_s, noop_rate, noop_rss),
        ("events", events_s, events_rate, events_rss),
    ):
        print(f"{name:<8}{secs:>10.2f}{rate:>12.0f}   {', '.join(f'{m:.0f}' for m in rss)}")
    print(f"ratio events/no-op: {events_rate / noop_rate:.0%} (target >= 70 %)")
    print(f"delivery outcomes: {statuses}")


def main() -> None:
    args = parse_args()
    n = args.events

    workdir = Path(tempfile.mkdtemp(prefix="vfy-bench-drain-"))
    postgres, broker = embedded_stores(workdir, durable=True)
    try:
        start_stores(postgres, broker)
        noop, events, statuses = run(n, args.concurrency, postgres, broker, workdir)
    finally:
        broker.stop()
        postgres.stop()
    report(n, args.concurrency, noop, events, statuses)


if __name__ == "__main__":
    main()
