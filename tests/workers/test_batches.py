"""Batches in a real worker process: one transaction per batch, one savepoint per delivery.

Every test starts real ``celery worker`` processes (no eager mode) on the test's
PostgreSQL and Redis, and queues deliveries as the receiver does (queued, with their
accepted copy). ``deliveries.recorded_at`` defaults to ``now()``, the start time of the
transaction that wrote the row: one value for a whole batch, whatever its savepoints.
"""

from __future__ import annotations

import random
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import redis

from devtools.webhooks import (
    body_of,
    card_redemption,
    card_rollback,
    envelope,
    wait_until,
)
from tests.conftest import PipelineEnv, Processes
from workers.queue import ACCEPTED_HASH, DeliveryPublisher

pytestmark = pytest.mark.e2e


def redemption(event_id: str, redemption_id: str | None = None) -> str:
    data = card_redemption(
        "gift",
        redemption_id or f"r_{event_id}",
        amount=100,
        balance_after=5000,
        order_id=f"ord_{event_id}",
        voucher_id=f"v_{event_id}",
    )
    return body_of(envelope("redemption.succeeded", data, event_id=event_id)).decode()


def queue_bodies(redis_url: str, bodies: list[str]) -> list[str]:
    """Queue each body as one delivery (as the receiver does); their delivery ids."""
    publisher = DeliveryPublisher(redis_url, budget_seconds=5.0)
    ids = []
    try:
        for body in bodies:
            delivery_id = uuid.uuid4().hex
            publisher.publish(body, delivery_id, datetime.now(UTC).isoformat())
            ids.append(delivery_id)
    finally:
        publisher.close()
    return ids


def recorded(db: psycopg.Connection[Any], n: int) -> bool:
    row = db.execute("SELECT count(*) FROM deliveries").fetchone()
    return row is not None and row[0] >= n


def outcomes(db: psycopg.Connection[Any]) -> dict[str, int]:
    return dict(db.execute("SELECT outcome, count(*) FROM deliveries GROUP BY 1").fetchall())


def test_one_poison_event_among_99_good_ones_is_a_dead_letter_and_the_99_are_applied_in_one_batch(
    processes: Processes,
    pipeline_env: PipelineEnv,
    db: psycopg.Connection[Any],
    redis_client: redis.Redis,
    redis_url: str,
) -> None:
    bodies = [redemption(f"ev_good_{i}") for i in range(99)]
    # Valid for the schema; its redemption id is too long for the btree index, so the
    # handler's INSERT fails in PostgreSQL (SQLSTATE 54000) halfway through the batch.
    poison_id = "".join(uuid.uuid4().hex for _ in range(200))
    bodies.insert(50, redemption("ev_poison", redemption_id=poison_id))
    queue_bodies(redis_url, bodies)

    processes.worker(pipeline_env(WORKER_BATCH_FLUSH_MS="3000"), concurrency=1)
    wait_until(lambda: recorded(db, 100), timeout=60, what=processes.logs)

    assert outcomes(db) == {"processed": 99, "dead": 1}
    assert db.execute("SELECT count(*) FROM redemptions").fetchone() == (99,)
    assert db.execute("SELECT event_id, reason FROM dead_letters").fetchall() == [
        ("ev_poison", "rejected by the database: SQLSTATE 54000 (class 54, program limit exceeded)")
    ]
    # One transaction for the 100 (one now()), each delivery in its own savepoint.
    assert db.execute("SELECT count(DISTINCT recorded_at) FROM deliveries").fetchone() == (1,)
    wait_until(lambda: redis_client.hlen(ACCEPTED_HASH) == 0, timeout=10, what="copies forgotten")


def test_mixed_types_and_duplicates_inside_one_batch_each_end_with_their_own_outcome(
    processes: Processes,
    pipeline_env: PipelineEnv,
    db: psycopg.Connection[Any],
    redis_url: str,
) -> None:
    redeemed = redemption("ev_mixed_r")
    rollback = card_rollback("gift", "r_ev_mixed_r", "rr_mixed", amount=100, balance_after=5100)
    rolled = body_of(
        envelope("redemption.rollback.succeeded", rollback, event_id="ev_mixed_rb")
    ).decode()
    unknown = body_of(
        envelope("voucher.published", {"voucher": {"id": "v_1"}}, event_id="ev_mixed_u")
    ).decode()
    invalid_data = card_redemption("gift", "r_bad", amount=1, balance_after=1)
    invalid_data["redemption"]["date"] = "yesterday"
    invalid = body_of(envelope("redemption.succeeded", invalid_data, event_id="ev_bad")).decode()
    queue_bodies(redis_url, [redeemed, rolled, redeemed, unknown, invalid, rolled, "not json"])

    processes.worker(pipeline_env(WORKER_BATCH_FLUSH_MS="2000"), concurrency=1)
    wait_until(lambda: recorded(db, 7), timeout=60, what=processes.logs)

    assert db.execute(
        "SELECT event_id, status, attempts FROM events WHERE event_id LIKE 'ev_%' ORDER BY 1"
    ).fetchall() == [
        ("ev_bad", "dead", 1),
        ("ev_mixed_r", "processed", 1),
        ("ev_mixed_rb", "processed", 1),
        ("ev_mixed_u", "ignored", 1),
    ]
    assert outcomes(db) == {"processed": 2, "duplicate": 2, "ignored": 1, "dead": 2}
    assert db.execute("SELECT count(DISTINCT recorded_at) FROM deliveries").fetchone() == (1,)


def test_duplicates_across_two_workers_batches_at_once_apply_each_event_once(
    processes: Processes,
    pipeline_env: PipelineEnv,
    db: psycopg.Connection[Any],
    redis_url: str,
) -> None:
    events = [redemption(f"ev_twice_{i}") for i in range(150)]
    bodies = events * 3  # every event delivered three times
    random.Random(3).shuffle(bodies)
    env = pipeline_env(WORKER_BATCH_SIZE="20", WORKER_BATCH_FLUSH_MS="20")
    first = processes.worker(env, concurrency=2)
    second = processes.worker(env, concurrency=2)
    wait_until(  # both consuming before anything is queued
        lambda: all(
            b"ready" in path.read_bytes() for path in processes.log_dir.glob("worker-*.log")
        ),
        timeout=60,
        what=processes.logs,
    )
    queue_bodies(redis_url, bodies)

    wait_until(lambda: recorded(db, 450), timeout=120, what=processes.logs)

    assert outcomes(db) == {"processed": 150, "duplicate": 300}
    assert db.execute("SELECT count(*) FROM redemptions").fetchone() == (150,)
    assert db.execute("SELECT count(*) FROM events WHERE attempts <> 1").fetchone() == (0,)
    logs = [(processes.log_dir / f"worker-{i}.log").read_text() for i in range(2)]
    assert all('"event.' in log for log in logs), "both workers applied some"
    assert first.poll() is None
    assert second.poll() is None


def test_a_transient_fault_mid_batch_hands_that_delivery_over_and_loses_nothing(
    processes: Processes,
    pipeline_env: PipelineEnv,
    db: psycopg.Connection[Any],
    database_url: str,
    redis_client: redis.Redis,
    redis_url: str,
) -> None:
    bodies = [redemption(f"ev_tx_{i}") for i in range(30)]
    # Another transaction holds the inbox row of ev_tx_15 (uncommitted): the batch's claim
    # of it waits, then times out (lock_timeout, SQLSTATE 55P03): transient, this event only.
    blocker = psycopg.connect(database_url)
    blocker.execute(
        "INSERT INTO events (event_id, type, received_at) VALUES ('ev_tx_15', 'x', now())"
    )
    queue_bodies(redis_url, bodies)
    env = pipeline_env(
        WORKER_BATCH_FLUSH_MS="2000", PGOPTIONS="-c lock_timeout=300", RETRY_BACKOFF_MAX_SECONDS="2"
    )
    processes.worker(env, concurrency=1)
    try:
        wait_until(lambda: recorded(db, 29), timeout=60, what=processes.logs)
        wait_until(
            lambda: "delivery.handed_over" in processes.logs(), timeout=30, what=processes.logs
        )
        time.sleep(0.5)
        assert db.execute("SELECT count(*) FROM events WHERE event_id = 'ev_tx_15'").fetchone() == (
            0,
        )
    finally:
        blocker.rollback()  # the row disappears: the single-delivery task can claim it
        blocker.close()

    wait_until(lambda: recorded(db, 30), timeout=60, what=processes.logs)
    time.sleep(1)  # a second apply, if any, would show now
    assert outcomes(db) == {"processed": 30}
    assert db.execute("SELECT count(*) FROM redemptions").fetchone() == (30,)
    assert db.execute("SELECT count(*) FROM ledger_entries").fetchone() == (30,)
    wait_until(lambda: redis_client.hlen(ACCEPTED_HASH) == 0, timeout=10, what="copies forgotten")


@pytest.mark.parametrize(("flush_ms", "low", "high"), [("50", 0.0, 1.0), ("1500", 1.4, 3.5)])
def test_at_a_low_rate_a_delivery_waits_for_the_flush_deadline_not_for_a_full_batch(
    processes: Processes,
    pipeline_env: PipelineEnv,
    db: psycopg.Connection[Any],
    redis_url: str,
    flush_ms: str,
    low: float,
    high: float,
) -> None:
    processes.worker(pipeline_env(WORKER_BATCH_FLUSH_MS=flush_ms), concurrency=1)
    queue_bodies(redis_url, [redemption("ev_warm")])  # the worker is up once it is applied
    wait_until(lambda: recorded(db, 1), timeout=60, what=processes.logs)

    for i in range(4):  # far below a batch of 100
        queue_bodies(redis_url, [redemption(f"ev_slow_{i}")])
        wait_until(lambda n=i + 2: recorded(db, n), timeout=30, what=processes.logs)

    lags = [
        lag
        for (lag,) in db.execute(
            "SELECT extract(epoch FROM recorded_at - received_at)::float FROM deliveries"
            " WHERE event_id LIKE 'ev_slow_%'"
        ).fetchall()
    ]
    assert len(lags) == 4
    assert all(low <= lag < high for lag in lags), lags


def test_a_delivery_that_came_while_a_batch_was_in_flight_still_waits_for_its_own_deadline(
    processes: Processes,
    pipeline_env: PipelineEnv,
    db: psycopg.Connection[Any],
    database_url: str,
    redis_url: str,
) -> None:
    # The end of a batch is no reason to send the next one half empty: a delivery that
    # came while the pool was busy waits for its batch to fill or for its own deadline
    # (then goes at once). One pool process; its batch waits on a row lock held here.
    blocker = psycopg.connect(database_url)
    blocker.execute(
        "INSERT INTO events (event_id, type, received_at) VALUES ('ev_first', 'x', now())"
    )
    env = pipeline_env(WORKER_BATCH_FLUSH_MS="1500", PGOPTIONS="-c lock_timeout=30000")
    processes.worker(env, concurrency=1)
    queue_bodies(redis_url, [redemption("ev_first")])
    try:
        wait_until(
            lambda: (
                db.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                ).fetchone()
                == (1,)
            ),
            timeout=60,
            what=processes.logs,
        )
        queue_bodies(redis_url, [redemption("ev_second")])
        time.sleep(0.3)  # the consumer has it in its buffer, the pool process is busy
    finally:
        blocker.rollback()
        blocker.close()

    wait_until(lambda: recorded(db, 2), timeout=30, what=processes.logs)
    row = db.execute(
        "SELECT extract(epoch FROM recorded_at - received_at)::float FROM deliveries"
        " WHERE event_id = 'ev_second'"
    ).fetchone()
    assert row is not None
    assert 1.4 <= row[0] < 3.5, row
