"""Gauges read from PostgreSQL and Redis when Prometheus scrapes the web's ``/metrics``.

Computed in the ``/metrics`` request only (never on the webhook path), with short
timeouts: a slow or absent database costs a scrape at most about two seconds, and
``pipeline_state_up{source=...}`` says which source could not be read.

- ``pipeline_open_flags{category}``: flags waiting for a person.
- ``pipeline_dead_letters_pending``: dead letters not replayed yet.
- ``pipeline_oldest_waiting_event_age_seconds``: age of the oldest event not finished
  (``schemas.vocabulary.UNFINISHED_STATUSES``); 0 when none waits.
- ``pipeline_waiting_events``: how many events are not finished.
- ``pipeline_queue_depth{queue}``: messages waiting in the Redis lists.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import psycopg
import redis
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ops import store
from ops.context import OpsContext
from ops.params import one_of
from schemas.vocabulary import UNFINISHED_STATUSES

log = logging.getLogger(__name__)

SCRAPE_STATEMENT_TIMEOUT_MS = 1000
SCRAPE_POOL_WAIT_SECONDS = 1.0


class PipelineCollector(Collector):
    def __init__(self, context: OpsContext) -> None:
        self.context = context

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "pipeline_state_up",
            "1 when the last scrape could read the source of the pipeline_* gauges",
            labels=["source"],
        )
        yield from self._database(up)
        yield from self._redis(up)
        yield up

    def _database(self, up: GaugeMetricFamily) -> Iterable[Metric]:
        try:
            with self.context.transaction(
                statement_timeout_ms=SCRAPE_STATEMENT_TIMEOUT_MS,
                wait_seconds=SCRAPE_POOL_WAIT_SECONDS,
            ) as conn:
                flags = store.open_flags_by_category(conn)
                pending = store.pending_dead_letters(conn)
                waiting = store.waiting_events(conn)
        except psycopg.Error as exc:  # PoolTimeout is an OperationalError too
            log.warning("metrics.database_unreadable", extra={"error": type(exc).__name__})
            up.add_metric(["postgres"], 0)
            return
        up.add_metric(["postgres"], 1)
        open_flags = GaugeMetricFamily(
            "pipeline_open_flags", "Open flags waiting for a person", labels=["category"]
        )
        for category, count in flags.items():
            open_flags.add_metric([category], count)
        yield open_flags
        yield GaugeMetricFamily(
            "pipeline_dead_letters_pending", "Dead letters not replayed yet", value=pending
        )
        yield GaugeMetricFamily(
            "pipeline_waiting_events",
            f"Events whose processing has not finished ({one_of(UNFINISHED_STATUSES)})",
            value=int(waiting.get("n") or 0),
        )
        yield GaugeMetricFamily(
            "pipeline_oldest_waiting_event_age_seconds",
            "Age of the oldest event whose processing has not finished (0 when none)",
            value=max(0.0, float(waiting.get("age_seconds") or 0.0)),
        )

    def _redis(self, up: GaugeMetricFamily) -> Iterable[Metric]:
        try:
            depths = self.context.queue_depths()
        except redis.RedisError as exc:
            log.warning("metrics.redis_unreadable", extra={"error": type(exc).__name__})
            up.add_metric(["redis"], 0)
            return
        up.add_metric(["redis"], 1)
        depth = GaugeMetricFamily(
            "pipeline_queue_depth", "Messages waiting in a Redis list", labels=["queue"]
        )
        for queue, count in depths.items():
            depth.add_metric([queue], count)
        yield depth
