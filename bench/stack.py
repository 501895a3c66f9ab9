"""The processes ``bench.load`` measures: its embedded PostgreSQL and Redis, the ``web`` and
the ``worker`` as the Procfile runs them, and the sender of the deliveries."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg
import redis

from bench.common import (
    ROOT,
    celery_worker_command,
    embedded_stores,
    gunicorn_command,
    peak_rss_mb,
    start_stores,
)
from devtools.sender import Sender, percentile
from devtools.servers import free_port, wait_for_port
from devtools.stream import Stream
from devtools.webhooks import SECRET
from workers.queue import DELIVERY_QUEUE, PARKED_QUEUE


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
        self.postgres, self.broker = embedded_stores(workdir, durable=True)
        self.procs: list[subprocess.Popen[bytes]] = []

    # -- servers and processes ---------------------------------------------------------

    def start_servers(self) -> None:
        start_stores(self.postgres, self.broker)

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
        args = gunicorn_command(app)
        proc = self.spawn(f"web-{app.split(':')[0]}", args, env)
        wait_for_port(port, timeout=30)
        return proc, port

    def worker(self, **extra: str) -> subprocess.Popen[bytes]:
        args = celery_worker_command(
            "workers.app", "deliveries,jobs", self.args.worker_concurrency, "INFO"
        )
        return self.spawn("worker", args, self.env(**extra))

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

    def send(self, label: str, stream: Stream, port: int, rate: float | None = None) -> SendRun:
        sender = Sender(stream.deliveries, port, threads=self.args.concurrency, rate=rate)
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
        peaks = peak_rss_mb(pid)
    except psutil.NoSuchProcess:
        return []
    return [(label if i == 0 else f"{label} child {i}", mb) for i, mb in peaks]


def send_and_settle(
    bench: Bench, label: str, warm: Stream, stream: Stream, port: int, settle: bool
) -> SendRun:
    warm_run = bench.send(f"{label} warm-up", warm, port)
    if settle:
        ids = [a.delivery_id for a in warm_run.sender.accepted().values() if a.delivery_id]
        bench.wait_settled(ids, timeout=120)
    return bench.send(label, stream, port)
