"""The accepted set closes the window where Celery's transport can lose a message: a
delivery answered 202 that never reached the inbox is pushed again by the re-drive job, a
bounded number of times, then dead-lettered; one the inbox has is only forgotten."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import redis
from psycopg_pool import ConnectionPool

from devtools.webhooks import body_of, card_redemption, envelope
from tests.jobs.conftest import rows
from tests.jobs.test_redrive import a_while, queued
from workers import processing, queue
from workers.jobs.redrive import dead_letter_in, recorded_in, redrive
from workers.queue import (
    ACCEPTED_HASH,
    ACCEPTED_INDEX,
    ACCEPTED_PUSHES,
    DELIVERY_QUEUE,
    MAX_PUSHES,
    DeliveryPublisher,
)

Accept = Callable[..., str]
"""``accept(event_id, age_seconds=3600, body="")``: the delivery id."""


@pytest.fixture
def accept(redis_url: str, redis_client: redis.Redis) -> Accept:
    """What the receiver does for a 202, then pretend it happened ``age_seconds`` ago (by
    default an hour: older than the sweep's threshold of 600 s)."""

    def accepted(event_id: str, age_seconds: float = 3600, body: str = "") -> str:
        data = card_redemption("gift", f"r_{event_id}", amount=1500, balance_after=500)
        doc = envelope("redemption.succeeded", data, event_id=event_id)
        body = body or body_of(doc).decode()
        delivery_id = f"d_{event_id}"
        publisher = DeliveryPublisher(redis_url, 1.0)
        try:
            publisher.publish(body, delivery_id, datetime.now(UTC).isoformat())
        finally:
            publisher.close()
        redis_client.zadd(ACCEPTED_INDEX, {delivery_id: time.time() - age_seconds}, xx=True)
        return delivery_id

    return accepted


def lose_in_flight(client: redis.Redis) -> None:
    """A worker's BRPOP took the oldest message and the worker died before recording it."""
    assert client.rpop(DELIVERY_QUEUE) is not None


def test_a_delivery_lost_between_brpop_and_the_inbox_is_pushed_again_and_applied_once(
    pool: ConnectionPool, db: psycopg.Connection[Any], accept: Accept, redis_client: redis.Redis
) -> None:
    delivery_id = accept("ev_lost_in_flight")
    lose_in_flight(redis_client)

    result = redrive(pool, redis_client, 600, 5, a_while())

    assert result.accepted_repushed == 1
    [message] = queued(redis_client)
    assert message["delivery_id"] == delivery_id
    # The worker applies it, and forgets the copy once it is recorded.
    assert processing.process_delivery(pool, **message).status == "processed"
    queue.forget(redis_client, [delivery_id])
    assert redis_client.hlen(ACCEPTED_HASH) == 0
    assert redis_client.zcard(ACCEPTED_INDEX) == 0
    assert rows(db, "SELECT redemption_id, effect, amount FROM ledger_entries") == [
        ("r_ev_lost_in_flight", "debit", -1500)
    ]


def test_a_pushed_again_copy_is_judged_again_only_after_another_threshold(
    pool: ConnectionPool, accept: Accept, redis_client: redis.Redis
) -> None:
    accept("ev_twice")
    lose_in_flight(redis_client)
    assert queue.sweep(redis_client, recorded_in(pool), 600, a_while()).repushed == 1
    lose_in_flight(redis_client)  # lost again
    # Harmless twice: the second run within the threshold pushes nothing more.
    assert queue.sweep(redis_client, recorded_in(pool), 600, a_while()).repushed == 0
    assert redis_client.llen(DELIVERY_QUEUE) == 0
    assert redis_client.hlen(ACCEPTED_HASH) == 1


def test_a_delivery_recorded_before_its_worker_died_is_forgotten_not_pushed(
    pool: ConnectionPool, accept: Accept, redis_client: redis.Redis
) -> None:
    delivery_id = accept("ev_recorded")
    [message] = queued(redis_client)
    redis_client.delete(DELIVERY_QUEUE)
    # The worker committed, then died before deleting the copy.
    assert processing.process_delivery(pool, **message).status == "processed"

    result = queue.sweep(redis_client, recorded_in(pool), 600, a_while())

    assert (result.forgotten, result.repushed) == (1, 0)
    assert redis_client.llen(DELIVERY_QUEUE) == 0
    assert not redis_client.hexists(ACCEPTED_HASH, delivery_id)
    assert redis_client.zcard(ACCEPTED_INDEX) == 0


def test_young_copies_and_copies_waiting_behind_a_backlog_are_left_alone(
    pool: ConnectionPool, accept: Accept, redis_client: redis.Redis
) -> None:
    # Old, but still waiting in the queue behind a backlog (no worker took them yet).
    accept("ev_backlog_1")
    accept("ev_backlog_2", age_seconds=3500)
    # Taken by a worker a moment ago: still within the threshold.
    accept("ev_young", age_seconds=5)

    result = queue.sweep(redis_client, recorded_in(pool), 600, a_while())

    assert result == type(result)()
    assert redis_client.llen(DELIVERY_QUEUE) == 3
    assert redis_client.hlen(ACCEPTED_HASH) == 3


def test_copies_are_swept_in_bounded_batches_until_none_is_left(
    pool: ConnectionPool, accept: Accept, redis_client: redis.Redis
) -> None:
    for n in range(5):
        accept(f"ev_batch_{n}", age_seconds=3600 - n)
    redis_client.delete(DELIVERY_QUEUE)  # all five lost

    assert queue.sweep(redis_client, recorded_in(pool), 600, a_while(), batch_size=2).repushed == 5
    assert sorted(m["delivery_id"] for m in queued(redis_client)) == [
        f"d_ev_batch_{n}" for n in range(5)
    ]


def age(client: redis.Redis, delivery_id: str, seconds: float = 3600) -> None:
    """Pretend the copy was last accepted or pushed ``seconds`` ago."""
    client.zadd(ACCEPTED_INDEX, {delivery_id: time.time() - seconds}, xx=True)


def pushes(client: redis.Redis, delivery_id: str) -> int:
    return int(client.hget(ACCEPTED_PUSHES, delivery_id) or 0)


def test_the_sweep_counts_its_pushes_of_each_delivery(
    pool: ConnectionPool, accept: Accept, redis_client: redis.Redis
) -> None:
    delivery_id = accept("ev_counted")
    assert pushes(redis_client, delivery_id) == 0
    for push in (1, 2):
        lose_in_flight(redis_client)
        assert queue.sweep(redis_client, recorded_in(pool), 600, a_while()).repushed == 1
        assert pushes(redis_client, delivery_id) == push
        age(redis_client, delivery_id)
    # Then a worker records it, and dies before deleting the copy: the sweep forgets the
    # copy, and its count with it.
    [message] = queued(redis_client)
    redis_client.delete(DELIVERY_QUEUE)
    assert processing.process_delivery(pool, **message).status == "processed"
    assert queue.sweep(redis_client, recorded_in(pool), 600, a_while()).forgotten == 1
    assert redis_client.hlen(ACCEPTED_PUSHES) == 0


def test_a_delivery_never_recorded_is_pushed_at_most_n_times_then_dead_lettered_with_its_body(
    pool: ConnectionPool, db: psycopg.Connection[Any], accept: Accept, redis_client: redis.Redis
) -> None:
    # A body every worker that takes it fails to record (the transport loses it, or a
    # worker crashes on it before its commit): the sweep must not push it for ever.
    delivery_id = accept("ev_never")
    [message] = queued(redis_client)
    for _ in range(MAX_PUSHES):
        lose_in_flight(redis_client)
        assert redrive(pool, redis_client, 600, 5, a_while()).accepted_repushed == 1
        age(redis_client, delivery_id)
    lose_in_flight(redis_client)

    result = redrive(pool, redis_client, 600, 5, a_while())

    assert redis_client.llen(DELIVERY_QUEUE) == 0  # not pushed a fourth time
    assert (result.accepted_repushed, result.accepted_dead_lettered) == (0, 1)
    reason = f"pushed {MAX_PUSHES} times by the accepted-set sweep and never recorded"
    assert rows(db, "SELECT event_id, delivery_id, type, reason FROM dead_letters") == [
        ("ev_never", delivery_id, "redemption.succeeded", reason)
    ]
    assert rows(db, "SELECT status, last_error, payload::text FROM events") == [
        ("dead", reason, rows(db, "SELECT %s::jsonb::text", message["body"])[0][0])
    ]
    assert rows(db, "SELECT outcome FROM deliveries") == [("dead",)]
    # Forgotten: copy, index entry and count.
    assert redis_client.hlen(ACCEPTED_HASH) == 0
    assert redis_client.zcard(ACCEPTED_INDEX) == 0
    assert redis_client.hlen(ACCEPTED_PUSHES) == 0
    # Harmless twice.
    assert redrive(pool, redis_client, 600, 5, a_while()) == type(result)()


def test_a_given_up_delivery_of_an_event_already_final_is_a_duplicate(
    pool: ConnectionPool, db: psycopg.Connection[Any], accept: Accept, redis_client: redis.Redis
) -> None:
    delivery_id = accept("ev_final_then_lost")
    [message] = queued(redis_client)
    # The same event, applied through another delivery (a Voucherify retry, say).
    assert processing.process_delivery(pool, message["body"], "d_other", message["received_at"])
    redis_client.delete(DELIVERY_QUEUE)
    redis_client.hset(ACCEPTED_PUSHES, delivery_id, MAX_PUSHES)

    result = queue.sweep(
        redis_client, recorded_in(pool), 600, a_while(), give_up=dead_letter_in(pool)
    )

    assert result.given_up == 1
    assert rows(db, "SELECT status FROM events") == [("processed",)]
    assert rows(db, "SELECT delivery_id, outcome FROM deliveries ORDER BY 1") == [
        ("d_ev_final_then_lost", "duplicate"),
        ("d_other", "processed"),
    ]
    assert rows(db, "SELECT count(*) FROM dead_letters") == [(0,)]
    assert redis_client.hlen(ACCEPTED_HASH) == 0


def test_a_hostile_body_given_up_by_the_sweep_is_dead_lettered_with_its_body_as_text(
    pool: ConnectionPool, db: psycopg.Connection[Any], accept: Accept, redis_client: redis.Redis
) -> None:
    data = card_redemption("gift", "r_hostile", amount=1, balance_after=1)
    body = body_of(envelope("redemption.succeeded", data, event_id="ev_\ud800")).decode()
    body = body.replace('"project_id":', '"x":NaN,"project_id":', 1)
    delivery_id = accept("hostile", body=body)
    redis_client.delete(DELIVERY_QUEUE)
    redis_client.hset(ACCEPTED_PUSHES, delivery_id, MAX_PUSHES)

    assert redrive(pool, redis_client, 600, 5, a_while()).accepted_dead_lettered == 1

    [(event_id, status, raw_body)] = rows(db, "SELECT event_id, status, raw_body FROM events")
    assert event_id.startswith("ev_\ufffd~")
    assert (status, raw_body) == ("dead", body)
    assert rows(db, "SELECT count(*) FROM dead_letters") == [(1,)]
    assert redis_client.hlen(ACCEPTED_HASH) == 0


def test_without_a_dead_letter_callback_a_copy_out_of_pushes_is_kept_not_pushed(
    pool: ConnectionPool, accept: Accept, redis_client: redis.Redis
) -> None:
    delivery_id = accept("ev_kept")
    redis_client.delete(DELIVERY_QUEUE)
    redis_client.hset(ACCEPTED_PUSHES, delivery_id, MAX_PUSHES)

    result = queue.sweep(redis_client, recorded_in(pool), 600, a_while())

    assert (result.repushed, result.given_up) == (0, 0)
    assert redis_client.llen(DELIVERY_QUEUE) == 0
    assert redis_client.hexists(ACCEPTED_HASH, delivery_id)
    # Judged again only after another threshold, not at every run.
    score = redis_client.zscore(ACCEPTED_INDEX, delivery_id)
    assert score is not None
    assert score > time.time() - 60


def test_forgetting_a_copy_forgets_its_push_count(
    pool: ConnectionPool, accept: Accept, redis_client: redis.Redis
) -> None:
    delivery_id = accept("ev_forget")
    lose_in_flight(redis_client)
    assert queue.sweep(redis_client, recorded_in(pool), 600, a_while()).repushed == 1
    assert pushes(redis_client, delivery_id) == 1

    queue.forget(redis_client, [delivery_id])

    assert redis_client.hlen(ACCEPTED_PUSHES) == 0
    assert redis_client.hlen(ACCEPTED_HASH) == 0
