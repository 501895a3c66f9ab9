"""``/readyz`` (``web.health``): what a flood of probes costs Redis and PostgreSQL, and how
soon an outage shows. Real servers; a PostgreSQL of its own where one is stopped."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import redis

from config.settings import Settings
from devtools.servers import EmbeddedPostgres
from devtools.webhooks import wait_until
from web import health
from web.app import create_app

FLOOD_THREADS = 8  # gthread's threads per web process
FLOOD_CALLS = 25  # per thread


def flood(call: Callable[[], Any], threads: int = FLOOD_THREADS) -> tuple[list[Any], float]:
    """``call`` FLOOD_CALLS times in each of ``threads`` threads at once: the answers, and
    how long it took."""
    answers: list[Any] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def run() -> None:
        start.wait()
        mine = [call() for _ in range(FLOOD_CALLS)]
        with lock:
            answers.extend(mine)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    began = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return answers, time.monotonic() - began


def windows(elapsed: float) -> int:
    """How many cache windows ``elapsed`` seconds touch: the most checks one probe may make."""
    return 1 + int(elapsed // health.CACHE_SECONDS)


def sessions(db: psycopg.Connection[Any]) -> int:
    """Sessions PostgreSQL has opened on the test database so far."""
    db.execute("SELECT pg_stat_clear_snapshot()")
    row = db.execute(
        "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
    ).fetchone()
    assert row is not None
    return int(row[0])


def pings(redis_client: redis.Redis) -> int:
    stats: dict[str, Any] = redis_client.info("commandstats")
    return int(stats.get("cmdstat_ping", {}).get("calls", 0))


def status_of(client: Any) -> tuple[int, dict[str, Any]]:
    response = client.get("/readyz")
    return response.status_code, response.get_json()


OPS_TOKEN = "t" * 40


def test_readyz_names_no_host_and_the_primary_only_to_the_ops_token(settings: Settings) -> None:
    app = create_app(dataclasses.replace(settings, ops_api_token=OPS_TOKEN))
    client = app.test_client()
    parts = urlsplit(settings.redis_url)
    public = client.get("/readyz")
    assert public.get_json() == {"status": "ready"}
    assert str(parts.port) not in public.get_data(as_text=True)
    wrong = client.get("/readyz", headers={"Authorization": "Bearer " + "x" * 40})
    assert wrong.get_json() == {"status": "ready"}
    ops = client.get("/readyz", headers={"Authorization": f"Bearer {OPS_TOKEN}"})
    assert ops.get_json()["redis_primary"] == f"{parts.hostname}:{parts.port}"


def test_a_flood_of_readyz_from_many_threads_asks_each_server_once_per_window(
    settings: Settings, db: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    checks: list[str] = []

    def check_db(url: str) -> None:
        checks.append(url)
        health.check_database(url)  # the real check, on its own pool

    app = create_app(settings, check_db=check_db)
    sessions_before = sessions(db)
    redis_client.config_resetstat()

    answers, elapsed = flood(lambda: status_of(app.test_client()))

    assert len(answers) == FLOOD_THREADS * FLOOD_CALLS
    assert all(answer == (200, {"status": "ready"}) for answer in answers)
    assert 1 <= len(checks) <= windows(elapsed)
    # One PING per check, and one more before a new connection's first command (redis-py's
    # health check).
    assert 1 <= pings(redis_client) <= windows(elapsed) + 1
    # One connection for all of them (counted once PostgreSQL has flushed its statistics).
    assert sessions(db) - sessions_before <= 1


def test_readyz_keeps_its_one_postgres_connection_from_window_to_window(
    settings: Settings, db: psycopg.Connection[Any]
) -> None:
    checks: list[str] = []

    def check_db(url: str) -> None:
        checks.append(url)
        health.check_database(url)

    client = create_app(settings, check_db=check_db).test_client()
    pids = set()
    for window in range(1, 4):

        def checked_again(window: int = window) -> bool:
            return client.get("/readyz").status_code == 200 and len(checks) >= window

        # Ask until the window has passed and the probe checked again.
        wait_until(
            checked_again, timeout=health.CACHE_SECONDS + 5, interval=0.05, what="a new check"
        )
        rows = db.execute(
            "SELECT pid FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
        assert len(rows) == 1, rows  # the probe's one connection, kept open
        pids.add(rows[0][0])
    assert len(pids) == 1  # and the same one every window


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL this test may stop and start."""
    server = EmbeddedPostgres(tmp_path / "postgres", durable=False)
    server.start()
    yield server
    server.stop(mode="immediate")


def test_a_postgres_outage_shows_within_the_window_and_the_timeout_and_so_does_recovery(
    settings: Settings, own_postgres: EmbeddedPostgres
) -> None:
    app = create_app(dataclasses.replace(settings, database_url=own_postgres.url()))
    client = app.test_client()
    assert status_of(client) == (200, {"status": "ready"})
    bound = health.CACHE_SECONDS + health.OVERDUE_SECONDS

    own_postgres.stop(mode="immediate")
    _, answer = wait_until(
        lambda: (found := status_of(client))[0] == 503 and found,
        timeout=bound,
        interval=0.05,
        what="/readyz to report the outage",
    )
    assert answer["status"] == "unavailable"
    assert list(answer["failed"]) == ["postgres"]

    own_postgres.start()
    wait_until(
        lambda: status_of(client)[0] == 200,
        timeout=bound + health.CHECK_TIMEOUT_SECONDS,  # and the pool's one reconnect delay
        interval=0.05,
        what="/readyz to report the recovery",
    )


# --- the cache itself ---------------------------------------------------------------------


class Gate:
    """A check that answers at once the first time, then waits to be let through."""

    def __init__(self) -> None:
        self.calls = 0
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> None:
        self.calls += 1
        if self.calls > 1:
            self.entered.set()
            assert self.release.wait(10)


def test_callers_get_the_last_answer_while_a_check_runs_and_a_failure_once_it_is_overdue() -> None:
    now = [0.0]
    gate = Gate()
    probe = health.CachedProbe(
        "postgres", gate, cache_seconds=1.0, overdue_seconds=3.0, clock=lambda: now[0]
    )
    assert probe.failure() is None
    now[0] = 5.0  # the answer is old: the next caller checks, and hangs
    checker = threading.Thread(target=probe.failure)
    checker.start()
    assert gate.entered.wait(10)

    assert probe.failure() is None  # the last answer, while the check is not overdue
    now[0] = 8.5
    assert probe.failure() == health.OVERDUE  # 3.5 s into a 3 s bound: reported, not waited
    gate.release.set()
    checker.join()
    assert probe.failure() is None  # the check's answer, fresh
    assert gate.calls == 2


def test_the_first_callers_wait_for_the_first_check_at_most_until_it_is_overdue() -> None:
    gate = Gate()
    gate.calls = 1  # every call waits
    probe = health.CachedProbe("redis", gate, overdue_seconds=0.3)
    checker = threading.Thread(target=probe.failure)
    checker.start()
    assert gate.entered.wait(10)
    assert probe.failure() == health.OVERDUE  # no answer to serve: waited 0.3 s, then this
    gate.release.set()
    checker.join()
    assert probe.failure() is None
    assert gate.calls == 2


def test_a_failed_check_is_cached_like_a_success() -> None:
    calls = []

    def down() -> None:
        calls.append(1)
        raise ConnectionError("refused")

    now = [0.0]
    probe = health.CachedProbe("redis", down, cache_seconds=1.0, clock=lambda: now[0])
    assert [probe.failure() for _ in range(50)] == ["ConnectionError"] * 50
    assert len(calls) == 1
    now[0] = 1.0
    assert probe.failure() == "ConnectionError"
    assert len(calls) == 2
