"""The broker durability check: what a Redis that can lose accepted webhooks looks like."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from devtools.servers import EmbeddedRedis
from devtools.webhooks import wait_until
from tests.conftest import Processes, process_env
from workers.jobs import check_broker_durability


@pytest.fixture
def spare_redis(tmp_path: Path) -> Iterator[tuple[str, redis.Redis]]:
    """A Redis of this test's own, to misconfigure freely."""
    server = EmbeddedRedis(tmp_path / "redis")
    url = server.start()
    client = redis.Redis.from_url(url)
    try:
        yield url, client
    finally:
        client.close()
        server.stop()


class WithoutConfig:
    """A managed Redis where CONFIG is disabled: everything else is the real server."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def config_get(self, *args: Any) -> Any:
        raise redis.ResponseError("unknown command 'CONFIG'")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def test_aof_on_and_no_eviction_keep_the_promise(
    spare_redis: tuple[str, redis.Redis],
) -> None:
    assert check_broker_durability(spare_redis[1]) == []


def test_no_aof_and_an_evicting_policy_are_both_reported(
    spare_redis: tuple[str, redis.Redis],
) -> None:
    _, client = spare_redis
    client.config_set("appendonly", "no")
    client.config_set("maxmemory-policy", "allkeys-lru")
    problems = check_broker_durability(client)
    assert len(problems) == 2
    assert problems[0].startswith("appendonly is off")
    assert problems[1].startswith("maxmemory-policy is 'allkeys-lru'")


def test_appendfsync_no_is_reported(spare_redis: tuple[str, redis.Redis]) -> None:
    _, client = spare_redis
    client.config_set("appendfsync", "no")
    [problem] = check_broker_durability(client)
    assert problem.startswith("appendfsync is 'no'")


def test_without_config_it_says_so_and_still_checks_what_info_shows(
    spare_redis: tuple[str, redis.Redis],
) -> None:
    _, client = spare_redis
    client.config_set("maxmemory-policy", "volatile-lru")
    problems = check_broker_durability(WithoutConfig(client))  # type: ignore[arg-type]
    assert len(problems) == 2
    assert "cannot be verified" in problems[0]
    assert problems[1].startswith("maxmemory-policy is 'volatile-lru'")  # from INFO memory


@pytest.mark.e2e
def test_beat_warns_loudly_at_start_up_when_the_broker_can_lose_webhooks(
    processes: Processes,
    database_url: str,
    spare_redis: tuple[str, redis.Redis],
    tmp_path: Path,
) -> None:
    url, client = spare_redis
    client.config_set("maxmemory-policy", "allkeys-lru")
    env = process_env(DATABASE_URL=database_url, REDIS_URL=url, REDRIVE_INTERVAL_SECONDS="3600")
    processes.beat(env, tmp_path / "beat-schedule")

    def warning() -> dict[str, Any] | None:
        for line in processes.logs().splitlines():
            if '"broker.durability_warning"' in line:
                return dict(json.loads(line))
        return None

    line = wait_until(warning, timeout=60, what="the durability warning in beat's log")
    assert line["level"] == "error"
    assert line["role"] == "beat"
    assert "allkeys-lru" in line["problem"]
