"""The broker transport: a failed acknowledgement must not hold a prefetch slot forever."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu.transport import virtual

from compat.kombu_redis import QoS, Transport
from config.settings import Settings
from workers.celery_app import make_celery


class StubChannel:
    do_restore = False  # nothing to restore when the test's QoS is collected


class DeadPipeline:
    def execute(self) -> None:
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def full_window(size: int) -> QoS:
    qos = QoS(StubChannel(), prefetch_count=size)
    for tag in range(size):
        virtual.QoS.append(qos, object(), f"tag-{tag}")  # in hand, as after a BRPOP
    qos._remove_from_indices = lambda *_: DeadPipeline()  # Redis is gone
    qos.restore_by_tag = _refuse
    return qos


def _refuse(*_: Any, **__: Any) -> None:
    raise redis.ConnectionError("Connection refused.")


def test_acks_that_fail_on_a_dead_connection_still_free_the_window() -> None:
    qos = full_window(2)
    assert not qos.can_consume()
    for tag in ("tag-0", "tag-1"):
        with pytest.raises(redis.ConnectionError):  # still raised: Celery logs it
            qos.ack(tag)
    # The consumer asks Redis for more, finds the connection gone and reconnects.
    assert qos.can_consume()


def test_a_batch_ack_that_fails_still_frees_every_slot_of_the_batch() -> None:
    qos = full_window(3)
    qos.pipe_or_acquire = _dead_pipe  # type: ignore[method-assign]
    with pytest.raises(redis.ConnectionError):
        qos.ack_many(["tag-0", "tag-1"])
    assert qos.can_consume()
    assert qos._dirty == {"tag-0", "tag-1"}  # freed; tag-2 still in hand


def test_a_batch_ack_removes_every_message_from_the_unacked_hash_in_one_round_trip(
    redis_url: str,
) -> None:
    client = redis.Redis.from_url(redis_url)
    client.hset("unacked", mapping={"a": "1", "b": "2", "c": "3"})
    client.zadd("unacked_index", {"a": 1, "b": 2, "c": 3})
    qos = QoS(ClientChannel(client), prefetch_count=3)
    for tag in ("a", "b", "c"):
        virtual.QoS.append(qos, object(), tag)

    qos.ack_many(["a", "b"])

    assert client.hkeys("unacked") == [b"c"]
    assert client.zrange("unacked_index", 0, -1) == [b"c"]
    assert qos._dirty == {"a", "b"}
    client.close()


class ClientChannel(StubChannel):
    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.unacked_key, self.unacked_index_key = "unacked", "unacked_index"

    @contextlib.contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[redis.Redis]:
        yield self.client


@contextlib.contextmanager
def _dead_pipe(*_: Any, **__: Any) -> Iterator[Any]:
    class Pipe:
        def zrem(self, *_: Any) -> Pipe:
            return self

        def hdel(self, *_: Any) -> Pipe:
            return self

        def execute(self) -> None:
            raise redis.ConnectionError("Connection refused.")

    yield Pipe()


@pytest.mark.parametrize("requeue", [False, True])
def test_a_reject_that_fails_still_frees_its_slot(requeue: bool) -> None:
    qos = full_window(1)
    with pytest.raises(redis.ConnectionError):
        qos.reject("tag-0", requeue=requeue)
    assert qos.can_consume()


@pytest.mark.parametrize("scheme", ["redis", "rediss"])
def test_the_app_uses_it_for_redis_urls_and_rediss_keeps_tls(scheme: str) -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/unused",
            "REDIS_URL": f"{scheme}://127.0.0.1:1/0",
        }
    )
    connection = make_celery(settings).connection_for_read()
    try:
        assert connection.get_transport_cls() is Transport
        assert bool(connection.ssl) == (scheme == "rediss")
    finally:
        connection.release()
