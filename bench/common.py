"""What more than one benchmark script uses: the apps they serve, the embedded stores they
start, the commands that run the web and the worker, the peak RSS of a process and its
children, and how a run ends."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import psutil
import psycopg

from devtools.servers import EmbeddedPostgres, EmbeddedRedis
from migrations import apply_migrations

ROOT = Path(__file__).resolve().parent.parent
APPS = {"ours": "web.wsgi:app", "bare": "bench.bare_app:app"}


def embedded_stores(workdir: Path, *, durable: bool) -> tuple[EmbeddedPostgres, EmbeddedRedis]:
    """PostgreSQL in ``workdir/pg`` and Redis (AOF everysec) in ``workdir/redis``, not started."""
    return (
        EmbeddedPostgres(workdir / "pg", durable=durable),
        EmbeddedRedis(workdir / "redis", appendfsync="everysec"),
    )


def start_stores(postgres: EmbeddedPostgres, broker: EmbeddedRedis) -> None:
    """Start PostgreSQL, then Redis, then apply the migrations."""
    postgres.start()
    broker.start()
    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        apply_migrations(conn)


def stores_env(postgres: EmbeddedPostgres, broker: EmbeddedRedis, **extra: str) -> dict[str, str]:
    """This process's environment, pointed at the embedded stores, with ``extra`` on top."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": postgres.url(),
        "REDIS_URL": broker.url(),
        **extra,
    }


def gunicorn_command(app: str) -> list[str]:
    """gunicorn serving ``app`` with ``web/gunicorn.py``, as the Procfile's ``web``."""
    return [sys.executable, "-m", "gunicorn", "-c", "web/gunicorn.py", app]


def celery_worker_command(app: str, queues: str, concurrency: int, loglevel: str) -> list[str]:
    """``celery worker`` for ``app``, as the Procfile's ``worker``."""
    return [
        sys.executable, "-m", "celery", "-A", app, "worker", "--queues", queues,
        "--concurrency", str(concurrency), "--without-gossip", "--without-mingle",
        "--without-heartbeat", "--loglevel", loglevel,
    ]  # fmt: skip


def peak_rss_mb(pid: int) -> list[tuple[int, float]]:
    """VmHWM in MB of a process (0) and of each of its children (1, 2, ...), in psutil's
    order, leaving out those whose status can no longer be read."""
    parent = psutil.Process(pid)
    peaks = []
    for i, p in enumerate([parent, *parent.children(recursive=True)]):
        try:
            with open(f"/proc/{p.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        peaks.append((i, int(line.split()[1]) / 1024))
        except OSError:
            continue
    return peaks


def conclude(problems: list[str], workdir: Path, failed: str) -> int:
    """1 after printing ``failed`` (a template of ``{problems}`` and ``{workdir}``) when a
    check failed, keeping ``workdir``; else 0, ``workdir`` removed."""
    if problems:
        print(failed.format(problems="\n  ".join(problems), workdir=workdir))
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    return 0
