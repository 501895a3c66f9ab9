"""The Sentinel settings: how ``REDIS_SENTINELS`` and the rest are read, refused, and handed
to redis-py and kombu (no server needed: nothing here connects)."""

from __future__ import annotations

import pytest
from redis.sentinel import SentinelConnectionPool, SentinelManagedSSLConnection

from compat.kombu_redis import SentinelTransport
from config.settings import Settings, SettingsError
from workers.celery_app import broker_transport_options, broker_url, make_celery
from workers.queue import DeliveryPublisher, connect

BASE = {"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/unused"}


def settings(**env: str) -> Settings:
    return Settings.from_env({**BASE, "REDIS_URL": "redis://:pw@mymaster/3", **env})


def test_without_sentinels_redis_url_is_used_as_given() -> None:
    s = settings()
    assert s.redis_url == "redis://:pw@mymaster/3"
    assert s.redis_sentinel is None
    assert broker_url(s) == s.redis_url
    assert "master_name" not in broker_transport_options(s)


def test_sentinels_are_read_with_the_default_port_and_master() -> None:
    s = settings(REDIS_SENTINELS="10.0.0.1:26380, sentinel-b ,[::1]:5000")
    target = s.redis_sentinel
    assert target is not None
    assert target.sentinels == (("10.0.0.1", 26380), ("sentinel-b", 26379), ("::1", 5000))
    assert target.master == "mymaster"
    assert target.password is None
    assert target.url == "redis://:pw@mymaster/3"


def test_the_broker_is_kombus_sentinel_url_with_master_name_and_sentinel_password() -> None:
    s = settings(
        REDIS_SENTINELS="h1:1,h2:2",
        REDIS_SENTINEL_MASTER="pipeline-primary",
        REDIS_SENTINEL_PASSWORD="sentinel-secret",
    )
    assert broker_url(s) == "sentinel://:pw@h1:1/3;sentinel://:pw@h2:2/3"
    options = broker_transport_options(s)
    assert options["master_name"] == "pipeline-primary"
    assert options["sentinel_kwargs"]["password"] == "sentinel-secret"
    connection = make_celery(s).connection_for_read()
    try:
        assert connection.get_transport_cls() is SentinelTransport  # with the ack fix
    finally:
        connection.release()


def test_every_redis_client_is_a_sentinel_managed_one() -> None:
    s = settings(REDIS_SENTINELS="127.0.0.1:1", REDIS_SENTINEL_PASSWORD="sentinel-secret")
    client = connect(s.redis_url, timeout=1)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster"
    assert pool.connection_kwargs["password"] == "pw"
    assert pool.connection_kwargs["db"] == 3
    sentinel = pool.sentinel_manager.sentinels[0]
    assert sentinel.connection_pool.connection_kwargs["password"] == "sentinel-secret"
    client.close()
    publisher = DeliveryPublisher(s.redis_url, budget_seconds=0.2)
    assert publisher.primary() is None  # not connected yet: nothing asked
    publisher.close()


def test_rediss_gives_the_primary_tls_connections() -> None:
    s = settings(
        REDIS_URL="rediss://:pw@mymaster/0?ssl_cert_reqs=none", REDIS_SENTINELS="127.0.0.1:1"
    )
    pool = connect(s.redis_url).connection_pool
    assert pool.connection_class is SentinelManagedSSLConnection
    assert make_celery(s).conf.broker_use_ssl == {"ssl_cert_reqs": 0}


def test_the_sentinel_password_is_never_printed() -> None:
    s = settings(REDIS_SENTINELS="h1:1", REDIS_SENTINEL_PASSWORD="sentinel-secret")
    assert "sentinel-secret" not in repr(s)
    assert "pw@" not in repr(s)


@pytest.mark.parametrize(
    ("env", "variable", "says"),
    [
        ({"REDIS_SENTINELS": "h1:notaport"}, "REDIS_SENTINELS", "not a host:port"),
        ({"REDIS_SENTINELS": "h1:1,h1:1"}, "REDIS_SENTINELS", "given twice"),
        ({"REDIS_SENTINELS": " , "}, "REDIS_SENTINELS", "expected comma-separated"),
        ({"REDIS_SENTINELS": "user@h1:1"}, "REDIS_SENTINELS", "not a host:port"),
        (
            {"REDIS_SENTINELS": "h1", "REDIS_URL": "unix:///tmp/redis.sock"},
            "REDIS_SENTINELS",
            "unix://",
        ),
        (
            {"REDIS_SENTINELS": "h1", "REDIS_SENTINEL_MASTER": "my master"},
            "REDIS_SENTINEL_MASTER",
            "letters",
        ),
        ({"REDIS_SENTINEL_PASSWORD": "x"}, "REDIS_SENTINEL_PASSWORD", "without REDIS_SENTINELS"),
        ({"REDIS_URL": "redis://h/0?sentinels=h1:1"}, "REDIS_URL", "REDIS_SENTINELS"),
        ({"ENQUEUE_MIN_REPLICAS": "-1"}, "ENQUEUE_MIN_REPLICAS", "from 0 to 16"),
        ({"ENQUEUE_REPLICA_TIMEOUT_MS": "0"}, "ENQUEUE_REPLICA_TIMEOUT_MS", "from 1 to 5000"),
        (
            {"ENQUEUE_MIN_REPLICAS": "1", "ENQUEUE_TIMEOUT_SECONDS": "0.5"},
            "ENQUEUE_REPLICA_TIMEOUT_MS",
            "below ENQUEUE_TIMEOUT_SECONDS",
        ),
    ],
)
def test_bad_sentinel_and_replica_settings_stop_the_process_naming_the_variable(
    env: dict[str, str], variable: str, says: str
) -> None:
    with pytest.raises(SettingsError, match=says) as caught:
        settings(**env)
    assert caught.value.variable == variable


def test_the_replica_minimum_and_its_timeout_are_read() -> None:
    s = settings(ENQUEUE_MIN_REPLICAS="2", ENQUEUE_REPLICA_TIMEOUT_MS="250")
    assert (s.enqueue_min_replicas, s.enqueue_replica_timeout_ms) == (2, 250)
