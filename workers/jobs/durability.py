"""Can the broker keep the receiver's promise? Checked when a worker or beat starts.

The receiver answers 202 once the raw body is in a Redis list; from then on Redis is the
only copy until a worker commits the event. That holds across a Redis restart or crash
only with the append-only file on (``appendonly yes``; ``appendfsync always`` loses
nothing, ``everysec`` at most about a second of accepted webhooks on a power failure), and
only if Redis never evicts our keys under memory pressure (``maxmemory-policy
noeviction``: a full Redis then refuses writes, the receiver answers 503 and Voucherify
retries). Anything else is reported loudly, once per start, at ERROR level.
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from workers import queue

log = logging.getLogger(__name__)


def check_broker_durability(client: redis.Redis) -> list[str]:
    """Problems that can lose accepted webhooks; empty when the settings keep the promise."""
    problems: list[str] = []
    config = _config(client)
    try:
        info: dict[str, Any] = dict(client.info("persistence"))
        info.update({k: v for k, v in client.info("memory").items() if k == "maxmemory_policy"})
    except redis.RedisError as exc:
        return [f"cannot read the broker's INFO ({exc}): durability cannot be verified"]
    if config is None:
        problems.append(
            "CONFIG GET is disabled on this Redis: appendfsync cannot be verified "
            "(checked what INFO shows instead)"
        )

    appendonly = config.get("appendonly") if config else None
    aof_enabled = str(info.get("aof_enabled", "")) == "1"
    if appendonly == "no" or (appendonly is None and not aof_enabled):
        problems.append(
            "appendonly is off: webhooks accepted since the last snapshot are lost if Redis "
            "restarts or crashes (set appendonly yes)"
        )
    fsync = config.get("appendfsync") if config else None
    if fsync == "no" and aof_enabled:
        problems.append(
            "appendfsync is 'no': the OS decides when the AOF reaches the disk, tens of "
            "seconds of accepted webhooks can be lost on a power failure (set everysec or "
            "always)"
        )
    if str(info.get("aof_last_write_status", "ok")) != "ok":
        problems.append("the last AOF write failed: Redis cannot persist what it accepts")
    if str(info.get("rdb_last_bgsave_status", "ok")) != "ok":
        problems.append("the last RDB snapshot failed: Redis may refuse writes")

    policy = (config.get("maxmemory-policy") if config else None) or info.get("maxmemory_policy")
    if policy is None:
        problems.append("maxmemory-policy cannot be read: eviction of queued webhooks possible")
    elif policy != "noeviction":
        problems.append(
            f"maxmemory-policy is {policy!r}: under memory pressure Redis may evict queued "
            "webhooks (set noeviction)"
        )
    return problems


def _config(client: redis.Redis) -> dict[str, str] | None:
    try:
        raw: dict[Any, Any] = dict(
            client.config_get("appendonly")
            | client.config_get("appendfsync")
            | client.config_get("maxmemory-policy")
        )
    except redis.ResponseError:  # managed services often rename or disable CONFIG
        return None
    return {_text(k): _text(v) for k, v in raw.items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def report_broker_durability(redis_url: str, process: str) -> list[str]:
    """Check and log: one ERROR line per problem, or one INFO line when all is well."""
    client = queue.connect(redis_url, timeout=5)
    try:
        problems = check_broker_durability(client)
    except redis.RedisError as exc:
        problems = [f"cannot reach the broker ({exc}): durability cannot be verified"]
    finally:
        client.close()
    for problem in problems:
        log.error("broker.durability_warning", extra={"role": process, "problem": problem})
    if not problems:
        log.info("broker.durability_checked", extra={"role": process, "ok": True})
    return problems
