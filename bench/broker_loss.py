"""How many accepted deliveries the broker loses when a worker is SIGKILLed or Redis restarts,
and how many of them the accepted set brings back.

    .venv/bin/python -m bench.broker_loss --fault kill  [--times 20] [--rate 100]
    .venv/bin/python -m bench.broker_loss --fault redis [--times 8]  [--rate 50]

Reproduces the weakness the README describes (Figures, "Weaknesses"): kombu's Redis transport
takes a message off the list (``BRPOP``, ``Channel._brpop_read``) before it records it in
its ``unacked`` hash (``QoS.append``); a worker SIGKILLed in between, or a Redis restart
that drops the ``BRPOP`` reply, loses that message for good, although the receiver had
answered 202 for it. The receiver therefore keeps a copy of each accepted delivery (the
accepted set, ``workers/queue/accepted.py``) that the re-drive job pushes again.

Starts its own PostgreSQL and Redis (AOF everysec), publishes a steady stream of
deliveries exactly as the receiver does (``DeliveryPublisher``, counted only once Redis
answered), runs one ``celery worker`` as the Procfile does, and ``--times`` times either
SIGKILLs the worker's process group and starts a new one, or shuts Redis down gracefully
and starts it again. Then waits until nothing is queued or unacknowledged and counts the
deliveries that never reached the ``deliveries`` table: the transport's own loss (the
baseline). Then runs the re-drive job's sweep of the accepted set once, waits again, and
counts again: what is still lost with the accepted set.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import redis
from psycopg_pool import ConnectionPool

from bench.common import ROOT, celery_worker_command, embedded_stores, start_stores, stores_env
from compat.kombu_redis import held_task_ids
from devtools.servers import EmbeddedPostgres, EmbeddedRedis
from devtools.webhooks import body_of, card_redemption, envelope
from workers.jobs.redrive import recorded_in
from workers.queue import DELIVERY_QUEUE, BrokerUnavailable, DeliveryPublisher, SweepResult, sweep


class Pusher(threading.Thread):
    """Publish ``rate`` deliveries a second as the receiver does, each until Redis took it."""

    def __init__(self, redis_url: str, rate: float) -> None:
        super().__init__(daemon=True)
        self.redis_url = redis_url
        self.rate = rate
        self.pushed: list[str] = []
        self.stop = threading.Event()
        data = card_redemption("gift", "r_TEMPLATE", amount=100, balance_after=5000)
        self.template = body_of(envelope("redemption.succeeded", data, event_id="ev_TEMPLATE"))

    def run(self) -> None:
        publisher = DeliveryPublisher(self.redis_url, budget_seconds=2.0)
        started = time.monotonic()
        i = 0
        while not self.stop.is_set():
            pause = started + i / self.rate - time.monotonic()
            if pause > 0:
                self.stop.wait(pause)
            body = self.template.decode().replace("TEMPLATE", f"loss_{i}")
            delivery_id = uuid.uuid4().hex
            while not self.stop.is_set():
                try:
                    publisher.publish(body, delivery_id, datetime.now(UTC).isoformat())
                except BrokerUnavailable:
                    continue  # the receiver would answer 503; Voucherify would retry
                self.pushed.append(delivery_id)  # what the receiver would answer 202 for
                break
            i += 1
        publisher.close()


class Worker:
    """The run's ``celery worker``, as the Procfile runs it; started again after a SIGKILL."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.proc = self.start(0)

    def start(self, n: int) -> subprocess.Popen[bytes]:
        args = celery_worker_command("workers.app", DELIVERY_QUEUE, 2, "WARNING")
        with (self.workdir / f"worker-{n}.log").open("wb") as log:
            return subprocess.Popen(
                args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def kill(self, n: int) -> None:
        """SIGKILL the worker's process group, then start worker ``n``."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = self.start(n)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fault", choices=("kill", "redis"), required=True)
    parser.add_argument("--times", type=int, default=None, help="kill: 20, redis: 8")
    parser.add_argument("--rate", type=float, default=None, help="kill: 100/s, redis: 50/s")
    return parser.parse_args()


def inject_faults(fault: str, times: int, worker: Worker, broker: EmbeddedRedis) -> None:
    time.sleep(3)  # the stream flows before the first fault
    for n in range(1, times + 1):
        time.sleep(random.uniform(0.5, 2.0) if fault == "kill" else 3.0)
        if fault == "kill":
            worker.kill(n)
        else:
            broker.stop()
            time.sleep(random.uniform(0.2, 2.0))
            broker.start()


def count_losses(
    postgres: EmbeddedPostgres, broker: EmbeddedRedis, pushed: list[str]
) -> tuple[list[str], SweepResult, list[str]]:
    """The ids lost by the transport, the sweep of the accepted set, the ids still lost."""
    lost = settle(postgres.url(), broker.url(), pushed)
    client = redis.Redis.from_url(broker.url())
    with ConnectionPool(postgres.url(), min_size=1, max_size=2) as pool:
        swept = sweep(
            client,
            recorded_in(pool),
            after_seconds=0,
            deadline=time.monotonic() + 60,
            held=held_task_ids,
        )
    client.close()
    still_lost = settle(postgres.url(), broker.url(), pushed)
    return lost, swept, still_lost


def main() -> int:
    args = parse_args()
    times = args.times or (20 if args.fault == "kill" else 8)
    rate = args.rate or (100.0 if args.fault == "kill" else 50.0)

    workdir = Path(tempfile.mkdtemp(prefix="vfy-bench-loss-"))
    postgres, broker = embedded_stores(workdir, durable=False)
    start_stores(postgres, broker)
    env = stores_env(
        postgres,
        broker,
        BROKER_VISIBILITY_TIMEOUT_SECONDS="10",
        RETRY_BACKOFF_MAX_SECONDS="4",
        LOG_LEVEL="WARNING",
        WORKER_METRICS_PORT="0",
    )
    pusher = Pusher(broker.url(), rate)
    worker = Worker(workdir, env)
    try:
        pusher.start()
        inject_faults(args.fault, times, worker, broker)
        pusher.stop.set()
        pusher.join()
        lost, swept, still_lost = count_losses(postgres, broker, pusher.pushed)
    finally:
        pusher.stop.set()
        worker.stop()
        broker.stop()
        postgres.stop(mode="immediate")
    shutil.rmtree(workdir, ignore_errors=True)

    what = "SIGKILLs of the worker" if args.fault == "kill" else "graceful Redis restarts"
    accepted = len(pusher.pushed)
    print(f"{times} {what}, {rate:g} deliveries/s: {accepted} accepted by Redis")
    print(f"  lost by the transport (baseline):   {len(lost)} ({len(lost) / accepted:.2%})")
    print(f"  pushed again by the accepted sweep: {swept.repushed}")
    print(f"  lost with the accepted set:         {len(still_lost)}")
    for delivery_id in still_lost[:10]:
        print(f"  still lost: {delivery_id}")
    return 1 if still_lost else 0


def settle(database_url: str, redis_url: str, pushed: list[str]) -> list[str]:
    """The ids never recorded, once all are, or nothing was queued or unacknowledged for
    15 s (longer than the visibility timeout: nothing more can come back), or after 3 min."""
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 180
    idle_since = None
    with psycopg.connect(database_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT count(*) FROM deliveries").fetchone()
            try:
                idle = client.llen(DELIVERY_QUEUE) == 0 and client.hlen("unacked") == 0
            except redis.RedisError:  # still loading its AOF after the last restart
                idle = False
            if row is not None and row[0] >= len(pushed) and idle:
                break
            idle_since = (idle_since or time.monotonic()) if idle else None
            if idle_since is not None and time.monotonic() - idle_since > 15:
                break
            time.sleep(1)
        recorded = {r[0] for r in conn.execute("SELECT delivery_id FROM deliveries")}
    client.close()
    return [d for d in pushed if d not in recorded]


if __name__ == "__main__":
    sys.exit(main())
