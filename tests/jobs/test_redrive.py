"""Re-drive: stuck events go back on the queue at most N times, then to the dead letters;
parked deliveries go back to the queue."""

from __future__ import annotations

import base64
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import redis
from psycopg_pool import ConnectionPool

from devtools.webhooks import body_of, card_redemption, envelope
from tests.jobs.conftest import rows, scalar
from workers import processing, queue
from workers.jobs.redrive import redrive
from workers.queue import DELIVERY_QUEUE, PARKED_QUEUE, PROCESS_DELIVERY_TASK


def a_while() -> float:
    return time.monotonic() + 60


def failed_event(
    pool: ConnectionPool, db: psycopg.Connection[Any], event_id: str, age_seconds: int = 3600
) -> str:
    """An event a worker gave up on (out of retries): ``failed`` in the inbox, body stored."""
    data = card_redemption("gift", f"r_{event_id}", amount=2000, balance_after=8000)
    body = body_of(envelope("redemption.succeeded", data, event_id=event_id)).decode()
    assert processing.record_failure(
        pool, body, uuid.uuid4().hex, datetime.now(UTC).isoformat(), "OperationalError: gone"
    )
    age(db, event_id, age_seconds)
    return body


def age(db: psycopg.Connection[Any], event_id: str, seconds: int) -> None:
    db.execute(
        "UPDATE events SET updated_at = now() - make_interval(secs => %s) WHERE event_id = %s",
        (seconds, event_id),
    )


def queued(client: redis.Redis) -> list[dict[str, Any]]:
    """The task kwargs of the messages on the deliveries queue, next to be consumed first."""
    messages = client.lrange(DELIVERY_QUEUE, 0, -1)
    out = []
    for raw in reversed(messages):  # kombu pops from the right
        message = json.loads(raw)
        assert message["headers"]["task"] == PROCESS_DELIVERY_TASK
        _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        out.append(kwargs)
    return out


def test_a_stuck_event_is_redriven_and_the_worker_then_applies_it(
    pool: ConnectionPool, db: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    failed_event(pool, db, "ev_stuck")

    result = redrive(pool, redis_client, 600, 5, a_while())

    assert result.redriven == 1
    [message] = queued(redis_client)
    assert message["delivery_id"].startswith("redrive-")
    assert scalar(db, "SELECT redrives FROM events WHERE event_id = 'ev_stuck'") == 1
    # What the worker does with the message: the event is applied, once.
    outcome = processing.process_delivery(pool, **message)
    assert outcome.status == "processed"
    assert rows(db, "SELECT status FROM events") == [("processed",)]
    assert rows(db, "SELECT redemption_id, effect, amount FROM ledger_entries") == [
        ("r_ev_stuck", "debit", -2000)
    ]
    # Harmless twice: nothing is stuck any more.
    assert redrive(pool, redis_client, 600, 5, a_while()).redriven == 0


def test_an_event_is_redriven_at_most_n_times_then_dead_lettered_with_the_reason(
    pool: ConnectionPool, db: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    failed_event(pool, db, "ev_lost")
    for attempt in (1, 2):  # the re-driven messages get lost too
        assert redrive(pool, redis_client, 600, 2, a_while()).redriven == 1
        assert scalar(db, "SELECT redrives FROM events") == attempt
        age(db, "ev_lost", 3600)

    result = redrive(pool, redis_client, 600, 2, a_while())

    assert (result.redriven, result.dead_lettered) == (0, 1)
    assert redis_client.llen(DELIVERY_QUEUE) == 2
    assert rows(db, "SELECT status FROM events") == [("dead",)]
    [(event_id, reason, delivery_id)] = rows(
        db, "SELECT event_id, reason, delivery_id FROM dead_letters"
    )
    assert event_id == "ev_lost"
    assert reason == "re-driven 2 times without success: OperationalError: gone"
    assert delivery_id is not None
    # Harmless twice: one dead letter, nothing more queued.
    age(db, "ev_lost", 3600)
    assert redrive(pool, redis_client, 600, 2, a_while()) == type(result)()
    assert scalar(db, "SELECT count(*) FROM dead_letters") == 1


def test_an_event_without_a_stored_body_is_dead_lettered_at_once(
    pool: ConnectionPool, db: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    db.execute(
        "INSERT INTO events (event_id, type, status, received_at, updated_at, last_error)"
        " VALUES ('ev_nobody', 'redemption.succeeded', 'received', now(),"
        " now() - interval '1 hour', NULL)"
    )
    assert redrive(pool, redis_client, 600, 5, a_while()).dead_lettered == 1
    assert rows(db, "SELECT reason FROM dead_letters") == [
        ("not re-drivable: the raw body is not stored",)
    ]
    assert redis_client.llen(DELIVERY_QUEUE) == 0


def test_events_a_worker_is_still_retrying_are_left_alone(
    pool: ConnectionPool, db: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    failed_event(pool, db, "ev_recent", age_seconds=30)
    assert redrive(pool, redis_client, 600, 5, a_while()).redriven == 0
    assert redis_client.llen(DELIVERY_QUEUE) == 0


def test_stuck_events_are_taken_in_bounded_batches_until_none_is_left(
    pool: ConnectionPool, db: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    for n in range(5):
        failed_event(pool, db, f"ev_batch_{n}")
    assert redrive(pool, redis_client, 600, 5, a_while(), batch_size=2).redriven == 5
    bodies = {r[0] for r in rows(db, "SELECT payload::text FROM events WHERE redrives = 1")}
    assert len(bodies) == 5
    assert {m["body"] for m in queued(redis_client)} == bodies


def test_parked_deliveries_go_back_to_the_queue_oldest_first(
    pool: ConnectionPool, redis_client: redis.Redis, redis_url: str
) -> None:
    for n in range(3):
        queue.park(
            redis_client, queue.Message(f'{{"n":{n}}}', f"d{n}", "2024-02-01T10:00:00+00:00")
        )

    assert redrive(pool, redis_client, 600, 5, a_while()).unparked == 3

    assert redis_client.llen(PARKED_QUEUE) == 0
    assert [m["delivery_id"] for m in queued(redis_client)] == ["d0", "d1", "d2"]
    assert redrive(pool, redis_client, 600, 5, a_while()).unparked == 0
