"""The fault tests' own PostgreSQL and Redis, which they stop, kill and restart at will."""

from __future__ import annotations

from pathlib import Path

import psycopg
import redis

from devtools.servers import EmbeddedPostgres, EmbeddedRedis
from migrations import apply_migrations


class Servers:
    def __init__(self, root: Path) -> None:
        self.postgres = EmbeddedPostgres(root / "pg", durable=False)
        # The README's broker settings: AOF on, fsync every second, no eviction.
        self.redis = EmbeddedRedis(root / "redis", appendfsync="everysec")

    def start(self) -> None:
        self.postgres.start()
        self.redis.start()
        with psycopg.connect(self.postgres.url(), autocommit=True) as conn:
            apply_migrations(conn)

    def stop(self) -> None:
        self.redis.stop()
        self.postgres.stop(mode="immediate")


def unacked(redis_url: str) -> int:
    """Messages taken by workers and not yet acknowledged (kombu's ``unacked`` hash)."""
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.hlen("unacked"))
    finally:
        client.close()
