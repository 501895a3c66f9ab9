"""The pipeline's state in one document (the CLI's ``stats``, ``GET /ops/api/stats``, the
dashboard's header) and the dashboard's overview around it."""

from __future__ import annotations

from datetime import UTC, datetime

import redis

from ops import store
from ops.context import OpsContext
from ops.params import DEFAULT_LIMIT
from ops.service import ATTENTION_STATUSES
from ops.store import Row
from schemas.vocabulary import FlagStatus


def pipeline_stats(context: OpsContext) -> Row:
    """Events, deliveries, lag, flags, dead letters and queue depths right now;
    ``queue_depth`` is None (and ``redis_error`` says why) when Redis cannot be read."""
    with context.transaction() as conn:
        stats = store.database_stats(conn)
    try:
        stats["queue_depth"] = context.queue_depths()
    except redis.RedisError as exc:
        stats["queue_depth"] = None
        stats["redis_error"] = type(exc).__name__
    stats["generated_at"] = datetime.now(UTC)
    return stats


def overview(context: OpsContext, minutes: int, limit: int = DEFAULT_LIMIT) -> Row:
    """The dashboard's first page: the stats, traffic per minute for the last ``minutes``,
    open flags, dead letters to replay and the events that failed today."""
    document: Row = {"stats": pipeline_stats(context)}
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    with context.transaction() as conn:
        document["minutes"] = store.per_minute(conn, minutes)
        document["flags"] = store.flags(conn, status=FlagStatus.OPEN, limit=limit)
        document["dead_letters"] = store.dead_letters(conn, replayed=False, limit=limit)
        failed = store.events(conn, statuses=ATTENTION_STATUSES, since=midnight, limit=limit)
    document["failed_today"] = failed.items
    return document
