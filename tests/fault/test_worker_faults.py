"""A real worker under fire: SIGKILL mid-batch, PostgreSQL gone for 15 s.

These tests run their own PostgreSQL and Redis (they stop them), and real ``celery
worker`` processes started the way the Procfile starts them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from devtools.webhooks import body_of, card_redemption, envelope, wait_until
from tests.conftest import Processes, process_env
from tests.fault.servers import Servers, unacked
from workers import queue
from workers.queue import ACCEPTED_HASH, DeliveryPublisher

pytestmark = pytest.mark.fault


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    servers = Servers(tmp_path / "servers")
    servers.start()
    yield servers
    servers.stop()


def worker_env(servers: Servers) -> dict[str, str]:
    return process_env(
        DATABASE_URL=servers.postgres.url(),
        REDIS_URL=servers.redis.url(),
        # Short horizons so the test sees redelivery and retries in seconds, not minutes.
        BROKER_VISIBILITY_TIMEOUT_SECONDS="10",
        RETRY_BACKOFF_MAX_SECONDS="4",
        EVENT_MAX_RETRIES="30",
    )


def enqueue_card_redemptions(redis_url: str, prefix: str, count: int) -> list[str]:
    """Deliveries accepted as the receiver accepts them: queued, with their accepted copy."""
    publisher = DeliveryPublisher(redis_url, budget_seconds=5.0)
    event_ids = []
    try:
        for i in range(count):
            event_id = f"ev_{prefix}_{i}"
            data = card_redemption("gift", f"r_{prefix}_{i}", amount=100 + i, balance_after=5000)
            body = body_of(envelope("redemption.succeeded", data, event_id=event_id)).decode()
            publisher.publish(body, uuid.uuid4().hex, datetime.now(UTC).isoformat())
            event_ids.append(event_id)
    finally:
        publisher.close()
    return event_ids


def count(url: str, query: str) -> int:
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            row = conn.execute(query).fetchone()
    except psycopg.OperationalError:
        return -1
    assert row is not None
    return int(row[0])


def wait_until_all_processed(
    url: str, total: int, processes: Processes, *, timeout: float, after: str
) -> None:
    """Waits until ``total`` events are processed; a timeout fails saying "every event
    applied after <after>", with the processes' logs."""
    wait_until(
        lambda: count(url, "SELECT count(*) FROM events WHERE status = 'processed'") == total,
        timeout=timeout,
        interval=0.5,
        what=lambda: f"every event applied after {after}\n" + processes.logs(),
    )


def assert_applied_exactly_once(url: str, event_ids: list[str], *, tries: int | None) -> None:
    with psycopg.connect(url) as conn:
        events: list[Any] = conn.execute(
            "SELECT event_id, status, attempts FROM events ORDER BY event_id"
        ).fetchall()
        entries: list[Any] = conn.execute(
            "SELECT redemption_id, count(*) FROM ledger_entries GROUP BY 1"
        ).fetchall()
        total = conn.execute("SELECT sum(amount) FROM ledger_entries").fetchone()
    assert sorted(e[0] for e in events) == sorted(event_ids)
    assert {e[1] for e in events} == {"processed"}
    if tries is not None:
        # attempts counts the event's committed tries (failed ones included): 1 means
        # it committed once and every redelivery found it done.
        assert {e[2] for e in events} == {tries}
    assert len(entries) == len(event_ids)
    assert {e[1] for e in entries} == {1}
    assert total is not None
    # ev_<prefix>_<i> spent 100 + i: the ledger total is right to the unit.
    assert total[0] == -sum(100 + int(e.rsplit("_", 1)[1]) for e in event_ids)


def test_a_worker_killed_with_sigkill_mid_batch_loses_nothing_and_applies_nothing_twice(
    servers: Servers, processes: Processes, tmp_path: Path
) -> None:
    """Late acks bring back what the killed worker held; what kombu itself lost (taken off
    the queue, not yet in its unacked hash) comes back through the accepted set, swept by
    the re-drive job that ``beat`` schedules, as in production."""
    env = {**worker_env(servers), "REDRIVE_INTERVAL_SECONDS": "1"}
    processes.beat(env, tmp_path / "beat-schedule")
    event_ids = enqueue_card_redemptions(servers.redis.url(), "kill", 400)
    url = servers.postgres.url()
    first = processes.worker(env)
    wait_until(
        lambda: count(url, "SELECT count(*) FROM events") >= 60,
        timeout=60,
        what=lambda: "the first worker to be mid-batch\n" + processes.logs(),
    )
    os.killpg(first.pid, signal.SIGKILL)  # main process and its pool: nothing can clean up
    first.wait(timeout=10)
    done_at_kill = count(url, "SELECT count(*) FROM events")
    assert done_at_kill < len(event_ids), "the batch finished before the kill: enqueue more"

    restarted = time.monotonic()
    processes.worker(env)
    # Within the visibility timeout (10 s here: what the dead worker held comes back then)
    # plus a margin for the drain: a delivery lost in flight is back after the sweep's
    # grace (5 s, half the visibility timeout), not after REDRIVE_AFTER_SECONDS.
    wait_until_all_processed(url, len(event_ids), processes, timeout=40, after="the restart")
    print(f"sigkill: every delivery applied {time.monotonic() - restarted:.1f} s after the restart")
    assert_applied_exactly_once(url, event_ids, tries=1)
    # Nothing left behind: every accepted copy forgotten by a worker or by the sweep.
    client = redis.Redis.from_url(servers.redis.url())
    try:
        wait_until(lambda: client.hlen(ACCEPTED_HASH) == 0, timeout=60, what="copies forgotten")
    finally:
        client.close()


def test_events_arriving_while_postgresql_is_down_for_15s_are_applied_once_it_is_back(
    servers: Servers, processes: Processes
) -> None:
    env = worker_env(servers)
    url = servers.postgres.url()
    processes.worker(env)
    before = enqueue_card_redemptions(servers.redis.url(), "before", 20)
    wait_until(lambda: count(url, "SELECT count(*) FROM events") == 20, timeout=60)

    servers.postgres.stop(mode="fast")
    during = enqueue_card_redemptions(servers.redis.url(), "during", 100)
    time.sleep(15)  # the outage itself, not a wait for a result
    servers.postgres.start()

    wait_until_all_processed(url, 120, processes, timeout=120, after="PostgreSQL came back")
    # Tries that failed while PostgreSQL was coming back are counted in attempts.
    assert_applied_exactly_once(url, before + during, tries=None)
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)


def test_a_worker_stopped_with_sigterm_mid_batch_hands_its_messages_back_at_once(
    servers: Servers, processes: Processes
) -> None:
    """Warm shutdown: the task in hand finishes, reserved messages return to the queue."""
    env = {**worker_env(servers), "BROKER_VISIBILITY_TIMEOUT_SECONDS": "3600"}
    env["RETRY_BACKOFF_MAX_SECONDS"] = "60"
    event_ids = enqueue_card_redemptions(servers.redis.url(), "term", 300)
    url = servers.postgres.url()
    first = processes.worker(env)
    wait_until(lambda: count(url, "SELECT count(*) FROM events") >= 40, timeout=60)
    first.terminate()
    assert first.wait(timeout=15) == 0  # billiard alone could hold it for 30 s
    assert count(url, "SELECT count(*) FROM events") < len(event_ids)

    # With a one-hour visibility timeout, only a clean hand-back lets this finish quickly.
    processes.worker(env)
    wait_until_all_processed(url, len(event_ids), processes, timeout=90, after="the restart")
    assert_applied_exactly_once(url, event_ids, tries=1)


def pool_processes(pid: int) -> list[int]:
    """The pool processes of the worker whose main process is ``pid``."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children


def test_a_worker_stopped_with_sigterm_while_a_batch_is_half_written_to_its_pool_still_exits(
    servers: Servers, processes: Processes
) -> None:
    """A batch job is larger than a pipe's buffer: stopped pool processes (SIGSTOP) read
    none of it, so the job is half written when SIGTERM comes. Celery's shutdown forgot
    the rest and the pool processes waited for it forever (compat/celery_asynpool.py)."""
    env = {**worker_env(servers), "BROKER_VISIBILITY_TIMEOUT_SECONDS": "3600"}
    url = servers.postgres.url()
    first = processes.worker(env)
    wait_until(lambda: len(pool_processes(first.pid)) == 2, timeout=60, what="the pool")
    pool = pool_processes(first.pid)
    for pid in pool:
        os.kill(pid, signal.SIGSTOP)
    try:
        event_ids = enqueue_card_redemptions(servers.redis.url(), "half", 300)
        # The consumer takes its prefetch window and sends a batch job to each process.
        wait_until(lambda: unacked(servers.redis.url()) >= 200, timeout=60, what="prefetch")
        time.sleep(1)
        first.terminate()
        time.sleep(1)  # the warm shutdown reaches the pool's flush and join
    finally:
        for pid in pool:
            os.kill(pid, signal.SIGCONT)
    try:
        assert first.wait(timeout=15) == 0
    except subprocess.TimeoutExpired:
        pytest.fail("the worker held SIGTERM\n" + processes.log_of(first).read_text()[-4000:])
    # The case it proves was there: the shutdown found half-written jobs and finished them.
    assert '"event":"pool.writes_finished"' in processes.log_of(first).read_text()

    processes.worker(env)
    wait_until_all_processed(url, len(event_ids), processes, timeout=90, after="the restart")
    assert_applied_exactly_once(url, event_ids, tries=1)


def lock_waiters(url: str) -> int:
    return count(
        url,
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND datname = current_database()",
    )


def test_a_delivery_whose_pool_process_keeps_dying_is_dead_lettered_and_the_rest_applied(
    servers: Servers, processes: Processes
) -> None:
    """Each start of a delivery is counted until it is recorded: one whose pool process
    died on it is applied alone from then on (the other 99 of its batch are not killed
    with it again), and after three deaths it is a dead letter instead of a fourth start.
    The test makes the process die: it holds the event's row locked, so the delivery's
    task waits there, and kills the pool each time a new start waits."""
    env = worker_env(servers)
    url = servers.postgres.url()
    holder = psycopg.connect(url)
    holder.execute(
        "INSERT INTO events (event_id, type, received_at)"
        " VALUES ('ev_poison_0', 'redemption.succeeded', now())"
    )
    holder.commit()
    holder.execute("SELECT 1 FROM events WHERE event_id = 'ev_poison_0' FOR UPDATE")
    [poison] = enqueue_card_redemptions(servers.redis.url(), "poison", 1)
    others = enqueue_card_redemptions(servers.redis.url(), "other", 60)
    worker = processes.worker(env)
    try:
        for kill in range(1, 4):
            # Killed pool processes leave their PostgreSQL backends waiting on the lock.
            wait_until(
                lambda k=kill: lock_waiters(url) >= k,
                timeout=60,
                what=lambda k=kill: f"start {k} waiting on the lock\n" + processes.logs(),
            )
            for pid in pool_processes(worker.pid):
                os.kill(pid, signal.SIGKILL)
    finally:
        holder.rollback()
        holder.close()

    wait_until(
        lambda: count(url, "SELECT count(*) FROM dead_letters WHERE event_id = 'ev_poison_0'") == 1,
        timeout=60,
        what=lambda: "the poison dead-lettered\n" + processes.logs(),
    )
    wait_until_all_processed(url, len(others), processes, timeout=60, after="the kills")
    assert_applied_exactly_once_among(url, others)
    with psycopg.connect(url) as conn:
        [(reason,)] = conn.execute("SELECT reason FROM dead_letters").fetchall()
        assert re.fullmatch(
            r"started [3-9] times without finishing: its worker process died on it", reason
        )
        assert conn.execute(
            "SELECT status FROM events WHERE event_id = %s", (poison,)
        ).fetchone() == ("dead",)
        assert conn.execute(
            "SELECT count(*) FROM ledger_entries WHERE redemption_id = 'r_poison_0'"
        ).fetchone() == (0,)


def assert_applied_exactly_once_among(url: str, event_ids: list[str]) -> None:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT e.event_id, e.status, count(l.*) FROM events e"
            " LEFT JOIN ledger_entries l ON l.redemption_id = 'r_' || substr(e.event_id, 4)"
            " WHERE e.event_id = ANY(%s) GROUP BY 1, 2",
            (event_ids,),
        ).fetchall()
    assert sorted(r[0] for r in rows) == sorted(event_ids)
    assert {(r[1], r[2]) for r in rows} == {("processed", 1)}


def test_a_backlog_behind_a_replay_waits_out_many_sweeps_and_every_202_is_applied_once(
    servers: Servers, processes: Processes, tmp_path: Path
) -> None:
    """Workers down, a replayed message (no accepted copy) at the head of the queue, 150
    accepted deliveries behind it for many thresholds of the sweep: none is pushed again,
    none dead-lettered; workers back, each applied once (before issue 22: all 150 dead)."""
    env = {
        **worker_env(servers),
        "REDRIVE_INTERVAL_SECONDS": "1",
        "REDRIVE_AFTER_SECONDS": "2",
        "BROKER_VISIBILITY_TIMEOUT_SECONDS": "10",  # a sweep grace of 5 s
    }
    data = card_redemption("gift", "r_replayed", amount=100, balance_after=5000)
    replayed = queue.Message(
        body_of(envelope("redemption.succeeded", data, event_id="ev_replayed")).decode(),
        "replay-1",
        datetime.now(UTC).isoformat(),
    )
    client = redis.Redis.from_url(servers.redis.url())
    try:
        queue.requeue(client, [replayed])
        event_ids = enqueue_card_redemptions(servers.redis.url(), "backlog", 150)
        url = servers.postgres.url()
        time.sleep(6)  # every copy past the sweep's grace, and three thresholds old
        for _ in range(5):  # an operator's sweeps while the workers are down
            run = subprocess.run(
                [sys.executable, "-m", "ops.cli", "jobs", "run", "redrive"],
                env=env,
                capture_output=True,
                timeout=60,
                check=False,
            )
            assert run.returncode == 0, run.stderr.decode()[-2000:]
            result = json.loads(run.stdout)["result"]
            assert (result["accepted_repushed"], result["accepted_given_up"]) == (0, 0), result
        assert client.llen(queue.DELIVERY_QUEUE) == 151  # not doubled
        assert client.hlen(queue.ACCEPTED_PUSHES) == 0
        processes.worker(env)
        processes.beat(env, tmp_path / "beat-schedule")
        wait_until_all_processed(url, 151, processes, timeout=90, after="the workers came back")
        assert_applied_exactly_once_among(url, event_ids)
        assert count(url, "SELECT count(*) FROM dead_letters") == 0
        wait_until(lambda: client.hlen(ACCEPTED_HASH) == 0, timeout=30, what="copies forgotten")
        assert client.llen(queue.DELIVERY_QUEUE) == 0
    finally:
        client.close()
