"""The accepted set closes the window where Celery's transport can lose a message: a
delivery answered 202 that never reached the inbox, and is neither waiting in a list nor
held by a worker, is pushed again by the re-drive job, a bounded number of times, then
recorded failed for the re-drive of stuck events; one the inbox has is only forgotten;
one still waiting, however long, is never touched."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import kombu
import psycopg
import pytest
import redis
from psycopg_pool import ConnectionPool

from compat.kombu_redis import held_task_ids
from devtools.webhooks import body_of, card_redemption, envelope
from tests.jobs.conftest import rows
from tests.jobs.test_redrive import a_while, queued
from workers import processing, queue
from workers.jobs.redrive import fail_in, recorded_in, redrive
from workers.queue import (
    ACCEPTED_HASH,
    ACCEPTED_INDEX,
    ACCEPTED_PUSHES,
    DELIVERY_QUEUE,
    MAX_PUSHES,
    PARKED_QUEUE,
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


def sweep(pool: ConnectionPool, client: redis.Redis, **options: Any) -> queue.SweepResult:
    """The sweep as the re-drive job runs it, at a threshold of 600 s."""
    return queue.sweep(client, recorded_in(pool), 600, a_while(), held=held_task_ids, **options)


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
    assert sweep(pool, redis_client).repushed == 1
    lose_in_flight(redis_client)  # lost again
    # Harmless twice: the second run within the threshold pushes nothing more.
    assert sweep(pool, redis_client).repushed == 0
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

    result = sweep(pool, redis_client)

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
    # Accepted a moment ago: within the threshold.
    accept("ev_young", age_seconds=5)

    result = sweep(pool, redis_client)

    assert result == type(result)()
    assert redis_client.llen(DELIVERY_QUEUE) == 3
    assert redis_client.hlen(ACCEPTED_HASH) == 3


def test_copies_are_swept_in_bounded_batches_until_none_is_left(
    pool: ConnectionPool, accept: Accept, redis_client: redis.Redis
) -> None:
    for n in range(5):
        accept(f"ev_batch_{n}", age_seconds=3600 - n)
    redis_client.delete(DELIVERY_QUEUE)  # all five lost

    assert sweep(pool, redis_client, batch_size=2).repushed == 5
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
        assert sweep(pool, redis_client).repushed == 1
        assert pushes(redis_client, delivery_id) == push
        age(redis_client, delivery_id)
    # Then a worker records it, and dies before deleting the copy: the sweep forgets the
    # copy, and its count with it.
    [message] = queued(redis_client)
    redis_client.delete(DELIVERY_QUEUE)
    assert processing.process_delivery(pool, **message).status == "processed"
    assert sweep(pool, redis_client).forgotten == 1
    assert redis_client.hlen(ACCEPTED_PUSHES) == 0


def test_a_delivery_lost_n_times_is_recorded_failed_with_its_body_and_re_driven(
    pool: ConnectionPool, db: psycopg.Connection[Any], accept: Accept, redis_client: redis.Redis
) -> None:
    # A delivery the transport keeps losing: the sweep must not push it for ever, and
    # must not make it final either (a later delivery still applies the event).
    delivery_id = accept("ev_never")
    [message] = queued(redis_client)
    for _ in range(MAX_PUSHES):
        lose_in_flight(redis_client)
        assert redrive(pool, redis_client, 600, 5, a_while()).accepted_repushed == 1
        age(redis_client, delivery_id)
    lose_in_flight(redis_client)

    result = redrive(pool, redis_client, 600, 5, a_while())

    assert redis_client.llen(DELIVERY_QUEUE) == 0  # not pushed a fourth time
    assert (result.accepted_repushed, result.accepted_given_up) == (0, 1)
    reason = f"lost {MAX_PUSHES} times in the queue (accepted-set sweep)"
    assert rows(db, "SELECT status, last_error, payload::text FROM events") == [
        ("failed", reason, rows(db, "SELECT %s::jsonb::text", message["body"])[0][0])
    ]
    assert rows(db, "SELECT count(*) FROM dead_letters") == [(0,)]
    # Forgotten: copy, index entry and count.
    assert redis_client.hlen(ACCEPTED_HASH) == 0
    assert redis_client.zcard(ACCEPTED_INDEX) == 0
    assert redis_client.hlen(ACCEPTED_PUSHES) == 0
    # A stuck event from now on: the re-drive of stuck events pushes its body again...
    db.execute("UPDATE events SET updated_at = now() - interval '1 hour'")
    assert redrive(pool, redis_client, 600, 5, a_while()).redriven == 1
    [again] = queued(redis_client)
    # ...and that delivery applies it, once.
    assert processing.process_delivery(pool, **again).status == "processed"
    assert rows(db, "SELECT redemption_id, effect, amount FROM ledger_entries") == [
        ("r_ev_never", "debit", -1500)
    ]


def test_the_original_message_of_a_given_up_delivery_still_applies_its_event(
    pool: ConnectionPool, db: psycopg.Connection[Any], accept: Accept, redis_client: redis.Redis
) -> None:
    delivery_id = accept("ev_late_original")
    [message] = queued(redis_client)
    redis_client.delete(DELIVERY_QUEUE)
    redis_client.hset(ACCEPTED_PUSHES, delivery_id, MAX_PUSHES)
    assert sweep(pool, redis_client, give_up=fail_in(pool)).given_up == 1

    assert processing.process_delivery(pool, **message).status == "processed"

    assert rows(db, "SELECT status FROM events") == [("processed",)]
    assert rows(db, "SELECT outcome FROM deliveries") == [("processed",)]


def test_a_given_up_delivery_of_an_event_already_final_is_a_duplicate(
    pool: ConnectionPool, db: psycopg.Connection[Any], accept: Accept, redis_client: redis.Redis
) -> None:
    delivery_id = accept("ev_final_then_lost")
    [message] = queued(redis_client)
    # The same event, applied through another delivery (a Voucherify retry, say).
    assert processing.process_delivery(pool, message["body"], "d_other", message["received_at"])
    redis_client.delete(DELIVERY_QUEUE)
    redis_client.hset(ACCEPTED_PUSHES, delivery_id, MAX_PUSHES)

    result = sweep(pool, redis_client, give_up=fail_in(pool))

    assert result.given_up == 1
    assert rows(db, "SELECT status FROM events") == [("processed",)]
    assert rows(db, "SELECT delivery_id, outcome FROM deliveries ORDER BY 1") == [
        ("d_ev_final_then_lost", "duplicate"),
        ("d_other", "processed"),
    ]
    assert rows(db, "SELECT count(*) FROM dead_letters") == [(0,)]
    assert redis_client.hlen(ACCEPTED_HASH) == 0


def test_a_hostile_body_given_up_by_the_sweep_is_recorded_with_its_body_as_text(
    pool: ConnectionPool, db: psycopg.Connection[Any], accept: Accept, redis_client: redis.Redis
) -> None:
    data = card_redemption("gift", "r_hostile", amount=1, balance_after=1)
    body = body_of(envelope("redemption.succeeded", data, event_id="ev_\ud800")).decode()
    body = body.replace('"project_id":', '"x":NaN,"project_id":', 1)
    delivery_id = accept("hostile", body=body)
    redis_client.delete(DELIVERY_QUEUE)
    redis_client.hset(ACCEPTED_PUSHES, delivery_id, MAX_PUSHES)

    assert redrive(pool, redis_client, 600, 5, a_while()).accepted_given_up == 1

    [(event_id, status, raw_body)] = rows(db, "SELECT event_id, status, raw_body FROM events")
    assert event_id.startswith("ev_\ufffd~")
    assert (status, raw_body) == ("failed", body)
    assert redis_client.hlen(ACCEPTED_HASH) == 0


def test_without_a_dead_letter_callback_a_copy_out_of_pushes_is_kept_not_pushed(
    pool: ConnectionPool, accept: Accept, redis_client: redis.Redis
) -> None:
    delivery_id = accept("ev_kept")
    redis_client.delete(DELIVERY_QUEUE)
    redis_client.hset(ACCEPTED_PUSHES, delivery_id, MAX_PUSHES)

    result = sweep(pool, redis_client)

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
    assert sweep(pool, redis_client).repushed == 1
    assert pushes(redis_client, delivery_id) == 1

    queue.forget(redis_client, [delivery_id])

    assert redis_client.hlen(ACCEPTED_PUSHES) == 0
    assert redis_client.hlen(ACCEPTED_HASH) == 0


def test_copies_waiting_behind_a_replay_at_the_head_are_never_pushed_or_given_up(
    pool: ConnectionPool, db: psycopg.Connection[Any], accept: Accept, redis_client: redis.Redis
) -> None:
    # Workers down: a replayed dead letter (no accepted copy) is at the consuming end, a
    # backlog of accepted deliveries waits behind it far past the threshold.
    replay = queue.Message(
        body_of(envelope("redemption.failed", {}, event_id="ev_r")).decode(),
        "replay-1",
        datetime.now(UTC).isoformat(),
    )
    queue.requeue(redis_client, [replay])
    ids = [accept(f"ev_wait_{n}", age_seconds=3600 - n) for n in range(30)]

    for _ in range(MAX_PUSHES + 2):  # many runs, far more than the pushes allowed
        result = redrive(pool, redis_client, 600, 5, a_while())
        assert (result.accepted_repushed, result.accepted_given_up) == (0, 0)

    assert redis_client.llen(DELIVERY_QUEUE) == 31  # not doubled
    assert redis_client.hlen(ACCEPTED_HASH) == 30
    assert redis_client.hlen(ACCEPTED_PUSHES) == 0
    assert rows(db, "SELECT count(*) FROM events") == [(0,)]
    assert {m["delivery_id"] for m in queued(redis_client)} == {"replay-1", *ids}


def test_a_copy_waiting_in_the_parked_list_is_left_alone(
    pool: ConnectionPool, accept: Accept, redis_client: redis.Redis
) -> None:
    accept("ev_parked")
    assert redis_client.lmove(DELIVERY_QUEUE, PARKED_QUEUE, "RIGHT", "LEFT") is not None

    assert sweep(pool, redis_client) == queue.SweepResult()
    assert redis_client.llen(PARKED_QUEUE) == 1
    assert redis_client.llen(DELIVERY_QUEUE) == 0


def test_a_copy_held_by_a_worker_unacknowledged_is_left_alone(
    pool: ConnectionPool, accept: Accept, redis_client: redis.Redis, redis_url: str
) -> None:
    delivery_id = accept("ev_held")
    # A consumer of kombu's own Redis transport takes it and does not acknowledge it.
    with kombu.Connection(redis_url) as connection:
        held = connection.SimpleQueue(DELIVERY_QUEUE, no_ack=False).get(timeout=5)
        assert held.headers["id"] == delivery_id

        assert sweep(pool, redis_client) == queue.SweepResult()
        assert redis_client.llen(DELIVERY_QUEUE) == 0
        assert redis_client.hexists(ACCEPTED_HASH, delivery_id)
        # Given back (a worker's warm shutdown): waiting again, still left alone.
        held.requeue()
    assert sweep(pool, redis_client) == queue.SweepResult()
    assert redis_client.llen(DELIVERY_QUEUE) == 1


def test_a_long_backlog_is_read_in_chunks_and_a_lost_copy_in_it_found(
    pool: ConnectionPool, accept: Accept, redis_client: redis.Redis
) -> None:
    lost = accept("ev_lost_mid_backlog")
    lose_in_flight(redis_client)
    filler = queue.Message("{}", "x", datetime.now(UTC).isoformat())
    redis_client.lpush(DELIVERY_QUEUE, *(filler.encode() for _ in range(2500)))
    ids = [accept(f"ev_old_{n}") for n in range(5)]

    result = sweep(pool, redis_client)

    assert result.repushed == 1
    assert redis_client.llen(DELIVERY_QUEUE) == 2500 + 5 + 1
    assert queued(redis_client)[-1]["delivery_id"] == lost
    assert all(redis_client.hexists(ACCEPTED_HASH, i) for i in ids)
