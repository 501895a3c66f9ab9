"""The fault tests' own PostgreSQL and Redis, which they stop, kill and restart at will."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import redis
from psycopg import sql

from devtools.servers import EmbeddedPostgres, EmbeddedRedis
from migrations import apply_migrations
from workers.app_settings import JOB_TASK_PREFIX
from workers.jobs.lock import LOCK_PREFIX


class Servers:
    def __init__(self, root: Path) -> None:
        self.postgres = EmbeddedPostgres(root / "pg", durable=False)
        # The README's broker settings: AOF on, fsync every second, no eviction.
        self.redis = EmbeddedRedis(root / "redis", appendfsync="everysec")

    def start(self) -> None:
        self.postgres.start()
        self.redis.start()
        with psycopg.connect(self.postgres.url(), autocommit=True) as conn:
            apply_migrations(conn)

    def stop(self) -> None:
        self.redis.stop()
        self.postgres.stop(mode="immediate")


@contextlib.contextmanager
def started_servers(prefix: str) -> Iterator[Servers]:
    """Servers started in a folder of their own, stopped and removed after.

    Not under pytest's tmp_path: every pytest session that starts on this machine takes
    group and other access off /tmp/pytest-of-<user>, and PostgreSQL runs as another
    user when we are root (see devtools/servers.py), so a concurrent session could
    lock it out of its data folder mid-run."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    servers = Servers(root)
    servers.start()
    yield servers
    servers.stop()
    shutil.rmtree(root, ignore_errors=True)


def unacked(redis_url: str) -> int:
    """Messages taken by workers and not yet acknowledged (kombu's ``unacked`` hash)."""
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.hlen("unacked"))
    finally:
        client.close()


# --- many processes at once (test_many_instances.py) ----------------------------------


def group_pids(pgid: int) -> set[int]:
    """The processes of a process group (a worker's main process and its pool), from /proc."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    pids.add(int(entry.name))
            except ProcessLookupError:
                continue  # it exited meanwhile
    return pids


def kill_groups(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL what is left of each process's group: children a main process left behind
    (a pool process, a gunicorn worker) keep its group and would keep running."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def job_in_hand(redis_url: str) -> bool:
    """Whether a job's lock is held or a worker holds a job task (kombu's ``unacked``)."""
    client = redis.Redis.from_url(redis_url)
    try:
        if any(True for _ in client.scan_iter(match=LOCK_PREFIX + "*", count=100)):
            return True
        return any(JOB_TASK_PREFIX.encode() in raw for raw in client.hvals("unacked"))
    finally:
        client.close()


SLOW_RUN_FUNCTION = "test_slow_job_run"


def slow_job_runs(url: str, jobs: tuple[str, ...], seconds: float) -> None:
    """Make every run of ``jobs`` last at least ``seconds`` longer: a trigger sleeps in the
    insert of its ``job_runs`` row, which happens under the job's lock (the row's
    ``started_at`` is taken before the sleep). Skipped runs are not slowed."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN PERFORM pg_sleep({seconds}); RETURN NEW; END $$"
            ).format(name=sql.Identifier(SLOW_RUN_FUNCTION), seconds=sql.Literal(seconds))
        )
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER {name} BEFORE INSERT ON job_runs FOR EACH ROW"
                " WHEN (NEW.outcome = 'running' AND NEW.job = ANY({jobs}))"
                " EXECUTE FUNCTION {name}()"
            ).format(name=sql.Identifier(SLOW_RUN_FUNCTION), jobs=sql.Literal(list(jobs)))
        )


def normal_job_runs(url: str) -> None:
    """Undo ``slow_job_runs`` (waits for the runs sleeping in it: the drop locks the table)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '30s'")
        conn.execute(
            sql.SQL("DROP TRIGGER {name} ON job_runs").format(
                name=sql.Identifier(SLOW_RUN_FUNCTION)
            )
        )
        conn.execute(
            sql.SQL("DROP FUNCTION {name}()").format(name=sql.Identifier(SLOW_RUN_FUNCTION))
        )
