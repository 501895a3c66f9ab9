"""The pipeline's state in one document: the CLI's ``stats``, ``GET /ops/api/stats`` and the
dashboard's header read it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import redis

from ops import queries
from ops.context import OpsContext


def pipeline_stats(context: OpsContext) -> dict[str, Any]:
    with context.transaction() as conn:
        stats = queries.database_stats(conn)
    try:
        stats["queue_depth"] = context.queue_depths()
    except redis.RedisError as exc:
        stats["queue_depth"] = None
        stats["redis_error"] = type(exc).__name__
    stats["generated_at"] = datetime.now(UTC)
    return stats
