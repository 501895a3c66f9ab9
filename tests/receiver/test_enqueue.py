"""The publisher's one-round-trip accept script on a real Redis: what it stores, and how it
recovers from a dropped connection or an error reply."""

from __future__ import annotations

import base64
import json
import threading
import time

import pytest
import redis

from workers.queue import (
    ACCEPTED_HASH,
    ACCEPTED_INDEX,
    DELIVERY_QUEUE,
    BrokerUnavailable,
    DeliveryPublisher,
)


def publish_one(redis_url: str) -> None:
    publisher = DeliveryPublisher(redis_url, 1.0)
    try:
        publisher.publish('{"a":1}', "d1", "2024-01-01T00:00:00+00:00")
    finally:
        publisher.close()


def test_an_accepted_delivery_is_queued_and_kept_until_recorded(
    redis_url: str, redis_client: redis.Redis
) -> None:
    publish_one(redis_url)
    [queued] = redis_client.lrange(DELIVERY_QUEUE, 0, -1)
    # The same bytes wait in the accepted set, keyed by delivery id, with the time accepted.
    assert redis_client.hgetall(ACCEPTED_HASH) == {b"d1": queued}
    [(member, score)] = redis_client.zrange(ACCEPTED_INDEX, 0, -1, withscores=True)
    assert member == b"d1"
    assert abs(score - time.time()) < 60


def test_published_message_is_the_delivery(redis_url: str, redis_client: redis.Redis) -> None:
    publish_one(redis_url)
    [raw] = redis_client.lrange(DELIVERY_QUEUE, 0, -1)
    _, kwargs, _ = json.loads(base64.b64decode(json.loads(raw)["body"]))
    assert kwargs == {
        "body": '{"a":1}',
        "delivery_id": "d1",
        "received_at": "2024-01-01T00:00:00+00:00",
    }


def test_threads_each_get_a_whole_message_in(redis_url: str, redis_client: redis.Redis) -> None:
    publisher = DeliveryPublisher(redis_url, 2.0)
    body = json.dumps({"pad": "x" * 6000})

    def send(thread: int) -> None:
        for i in range(25):
            publisher.publish(body, f"t{thread}-{i}", "2024-01-01T00:00:00+00:00")

    threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    publisher.close()
    ids = set()
    for raw in redis_client.lrange(DELIVERY_QUEUE, 0, -1):
        _, kwargs, _ = json.loads(base64.b64decode(json.loads(raw)["body"]))
        assert kwargs["body"] == body
        ids.add(kwargs["delivery_id"])
    assert len(ids) == 200


def test_a_dropped_connection_is_replaced(
    redis_url: str, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = DeliveryPublisher(redis_url, 2.0)
    publisher.publish("{}", "before", "t")
    # The server closes every client connection (as a Redis restart or a proxy would).
    assert redis_client.client_kill_filter(_type="normal", skipme=True) >= 1
    publisher.publish("{}", "after", "t")
    publisher.close()
    assert redis_client.llen(DELIVERY_QUEUE) == 2
    # The dead connection was noticed on the push, dropped, and the push retried.
    assert [r.message for r in caplog.records] == ["delivery.enqueue_failed"]


def test_an_error_reply_is_retried_then_given_up(
    redis_url: str, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    redis_client.set(DELIVERY_QUEUE, "not a list")  # LPUSH in the script now fails: WRONGTYPE
    publisher = DeliveryPublisher(redis_url, 0.3)
    with pytest.raises(BrokerUnavailable, match="WRONGTYPE"):
        publisher.publish("{}", "d1", "t")
    assert [r.message for r in caplog.records].count("delivery.enqueue_failed") >= 2
    # Nothing of the refused delivery stays behind: the script wrote nothing.
    assert redis_client.hlen(ACCEPTED_HASH) == 0
    # The connection is usable again once Redis takes the push.
    redis_client.delete(DELIVERY_QUEUE)
    publisher.publish("{}", "d2", "t")
    publisher.close()
    assert redis_client.llen(DELIVERY_QUEUE) == 1
    assert redis_client.hkeys(ACCEPTED_HASH) == [b"d2"]
