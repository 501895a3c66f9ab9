"""The entry task's failure path: a bad payload never escapes it, its copy never lingers.

The task body runs through a real Celery app (``make_celery``) called directly, not in
eager mode; the real worker process walks the same path in ``tests/e2e/``.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import redis
from celery import Task

from config.settings import Settings
from devtools.servers import free_port
from devtools.webhooks import body_of, envelope, fixture
from workers import processing
from workers.celery_app import make_celery
from workers.db import close_pool, get_pool
from workers.faults import TransientError
from workers.queue import ACCEPTED_HASH, ACCEPTED_PUSHES, PARKED_QUEUE, DeliveryPublisher, Message
from workers.tasks import SINGLE_DELIVERY_TASK, record_failure, retry_or_give_up


@pytest.fixture
def task(settings: Settings) -> Iterator[Task]:
    """The entry task of a real app; the process's pool is closed after the test."""
    app = make_celery(settings)
    yield app.tasks[SINGLE_DELIVERY_TASK]
    close_pool()


def hostile_body(event_id: str = "ev_\ud800") -> str:
    doc = envelope("redemption.succeeded", fixture("redemption.succeeded"), event_id=event_id)
    return body_of(doc).decode()


def deep_body(depth: int = 100_000) -> str:
    return hostile_body("ev_deep").replace(
        '"metadata":', '"metadata":' + "[" * depth + "]" * depth + ',"x":', 1
    )


def accepted(settings: Settings, body: str) -> Message:
    """What the receiver does for a 202: the message queued and its accepted copy kept."""
    message = Message(body, uuid.uuid4().hex, datetime.now(UTC).isoformat())
    publisher = DeliveryPublisher(settings.redis_url, 1.0)
    try:
        publisher.publish(message.body, message.delivery_id, message.received_at)
    finally:
        publisher.close()
    return message


def at_the_last_retry(task: Task, settings: Settings, message: Message, error: str) -> str:
    """``retry_or_give_up`` for a transient ``error`` with no retry left, on a pool of
    ``settings``' database; the task's answer."""
    pool = get_pool(settings.database_url)
    task.push_request(retries=settings.event_max_retries)
    try:
        return retry_or_give_up(task, settings, pool, message, TransientError(error))
    finally:
        task.pop_request()


def test_a_lone_surrogate_event_id_ends_dead_at_its_first_attempt_and_its_copy_is_forgotten(
    task: Task,
    settings: Settings,
    db: psycopg.Connection[Any],
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    message = accepted(settings, hostile_body())
    assert redis_client.hlen(ACCEPTED_HASH) == 1

    with caplog.at_level(logging.INFO, logger="workers.tasks"):
        status = task.run(message.body, message.delivery_id, message.received_at)

    assert status == "dead"
    reason = "not storable: the event id holds a lone surrogate"
    assert db.execute("SELECT reason FROM dead_letters").fetchall() == [(reason,)]
    assert redis_client.hlen(ACCEPTED_HASH) == 0
    [line] = [r for r in caplog.records if r.getMessage() == "event.dead"]
    assert line.__dict__["reason"] == reason


def test_a_crash_is_recorded_by_its_type_and_place_never_by_its_message(
    task: Task,
    settings: Settings,
    db: psycopg.Connection[Any],
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def crash(*_: Any) -> processing.Outcome:
        raise KeyError("card 4111 1111 1111 1111")  # a message quoting the payload

    monkeypatch.setattr(processing, "process_delivery", crash)
    message = accepted(settings, hostile_body("ev_crash"))

    with caplog.at_level(logging.INFO):
        status = task.run(message.body, message.delivery_id, message.received_at)

    assert status == "failed"
    assert db.execute("SELECT event_id, status, last_error FROM events").fetchall() == [
        ("ev_crash", "failed", "crashed: KeyError")
    ]
    assert redis_client.hlen(ACCEPTED_HASH) == 0  # recorded: the re-drive job takes over
    [line] = [r for r in caplog.records if r.getMessage() == "delivery.crashed"]
    assert line.__dict__["error"] == "crashed: KeyError"
    assert "test_tasks.py" in line.__dict__["where"]
    assert "4111" not in caplog.text


def test_out_of_retries_a_hostile_body_is_recorded_failed_not_raised(
    task: Task, settings: Settings, db: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    message = accepted(settings, hostile_body())

    status = at_the_last_retry(task, settings, message, "OperationalError (SQLSTATE 57P01)")

    assert status == "failed"
    [(event_id, event_status, raw_body)] = db.execute(
        "SELECT event_id, status, raw_body FROM events"
    ).fetchall()
    assert event_id.startswith("ev_\ufffd~")
    assert (event_status, raw_body) == ("failed", message.body)
    assert redis_client.hlen(ACCEPTED_HASH) == 0
    assert redis_client.llen(PARKED_QUEUE) == 0


def test_recording_a_failure_of_a_body_too_deep_to_parse_never_raises(
    settings: Settings, db: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    message = accepted(settings, deep_body())
    redis_client.hset(ACCEPTED_PUSHES, message.delivery_id, 2)  # the sweep pushed it before
    pool = get_pool(settings.database_url)
    try:
        assert record_failure(settings, pool, message, "SoftTimeLimitExceeded") is True
    finally:
        close_pool()

    assert db.execute("SELECT event_id, status FROM events").fetchall() == [
        (f"delivery:{message.delivery_id}", "failed")
    ]
    assert redis_client.hlen(ACCEPTED_HASH) == 0
    assert redis_client.hlen(ACCEPTED_PUSHES) == 0


def test_without_postgresql_a_hostile_body_is_parked_not_raised(
    task: Task, settings: Settings, redis_client: redis.Redis
) -> None:
    gone = dataclasses.replace(
        settings, database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    )
    message = accepted(settings, deep_body())

    status = at_the_last_retry(task, gone, message, "PoolTimeout: couldn't get a connection")

    assert status == "failed"
    assert redis_client.llen(PARKED_QUEUE) == 1
    assert redis_client.hlen(ACCEPTED_HASH) == 1  # parked, not recorded: the copy stays
