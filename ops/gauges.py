"""Gauges read from PostgreSQL and Redis when Prometheus scrapes the web's ``/metrics``.

Read in a ``/metrics`` request only (never on the webhook path), with short timeouts: a
slow or absent database costs a scrape at most about two seconds, and
``pipeline_state_up{source=...}`` says which source could not be read. A reading (four
queries in one transaction and one Redis round trip) is served again for
``CACHE_SECONDS`` per process, failures included, and one scrape at a time reads (the
others wait for its reading): a flood of scrapes costs the servers one reading per window
per process. Every value, ``pipeline_state_up`` too, is as of that reading.

The queue depths share the reading although Redis would bear a live one per scrape: the
broker is what the webhook path needs, and anyone may scrape (``METRICS_TOKEN`` is
optional), so a flood must not reach it either; and every ``pipeline_*`` value then
describes one moment.

- ``pipeline_open_flags{category}``: flags waiting for a person.
- ``pipeline_dead_letters_pending``: dead letters not replayed yet.
- ``pipeline_unmeasured_cards{kind}``: cards no movement has reported the balance after of yet.
- ``pipeline_oldest_waiting_event_age_seconds``: age of the oldest event not finished
  (``schemas.vocabulary.UNFINISHED_STATUSES``); 0 when none waits.
- ``pipeline_waiting_events``: how many events are not finished.
- ``pipeline_queue_depth{queue}``: messages waiting in the Redis lists.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

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
CACHE_SECONDS = 10.0
"""How long a reading is served again (per process) before PostgreSQL and Redis are read."""


@dataclass(frozen=True, slots=True)
class Tables:
    """What the four queries answered."""

    open_flags: dict[str, int]
    dead_letters_pending: int
    unmeasured_cards: dict[str, int]
    waiting: store.Row


@dataclass(frozen=True, slots=True)
class Reading:
    """One read of both sources; None where a source could not be read."""

    taken_at: float
    tables: Tables | None
    queue_depths: dict[str, int] | None


class PipelineCollector(Collector):
    def __init__(
        self,
        context: OpsContext,
        cache_seconds: float = CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.context = context
        self.cache_seconds = cache_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._reading: Reading | None = None

    def collect(self) -> Iterable[Metric]:
        reading = self.reading()
        up = GaugeMetricFamily(
            "pipeline_state_up",
            "1 when the last reading could read the source of the pipeline_* gauges",
            labels=["source"],
        )
        up.add_metric(["postgres"], 0 if reading.tables is None else 1)
        up.add_metric(["redis"], 0 if reading.queue_depths is None else 1)
        if reading.tables is not None:
            yield from _table_gauges(reading.tables)
        if reading.queue_depths is not None:
            yield _depth_gauge(reading.queue_depths)
        yield up

    def reading(self) -> Reading:
        """The last reading while it is younger than the window, else a new one."""
        if fresh := self._fresh():
            return fresh
        with self._lock:  # gthread: concurrent scrapes wait for one reading
            if fresh := self._fresh():
                return fresh
            tables, depths = self._read_tables(), self._read_queue_depths()
            self._reading = Reading(self._clock(), tables, depths)
            return self._reading

    def _fresh(self) -> Reading | None:
        reading = self._reading
        if reading is not None and self._clock() - reading.taken_at < self.cache_seconds:
            return reading
        return None

    def _read_tables(self) -> Tables | None:
        try:
            with self.context.transaction(
                statement_timeout_ms=SCRAPE_STATEMENT_TIMEOUT_MS,
                wait_seconds=SCRAPE_POOL_WAIT_SECONDS,
            ) as conn:
                return Tables(
                    open_flags=store.open_flags_by_category(conn),
                    dead_letters_pending=store.pending_dead_letters(conn),
                    unmeasured_cards=store.unmeasured_cards(conn),
                    waiting=dict(store.waiting_events(conn)),
                )
        except psycopg.Error as exc:  # PoolTimeout is an OperationalError too
            log.warning("metrics.database_unreadable", extra={"error": type(exc).__name__})
            return None

    def _read_queue_depths(self) -> dict[str, int] | None:
        try:
            return self.context.queue_depths()
        except redis.RedisError as exc:
            log.warning("metrics.redis_unreadable", extra={"error": type(exc).__name__})
            return None


def _table_gauges(tables: Tables) -> Iterable[Metric]:
    open_flags = GaugeMetricFamily(
        "pipeline_open_flags", "Open flags waiting for a person", labels=["category"]
    )
    for category, count in tables.open_flags.items():
        open_flags.add_metric([category], count)
    yield open_flags
    unmeasured = GaugeMetricFamily(
        "pipeline_unmeasured_cards",
        "Cards no movement has reported the balance after of yet: drift cannot measure them",
        labels=["kind"],
    )
    for kind, count in tables.unmeasured_cards.items():
        unmeasured.add_metric([kind], count)
    yield unmeasured
    yield GaugeMetricFamily(
        "pipeline_dead_letters_pending",
        "Dead letters not replayed yet",
        value=tables.dead_letters_pending,
    )
    yield GaugeMetricFamily(
        "pipeline_waiting_events",
        f"Events whose processing has not finished ({one_of(UNFINISHED_STATUSES)})",
        value=int(tables.waiting.get("n") or 0),
    )
    yield GaugeMetricFamily(
        "pipeline_oldest_waiting_event_age_seconds",
        "Age of the oldest event whose processing has not finished (0 when none)",
        value=max(0.0, float(tables.waiting.get("age_seconds") or 0.0)),
    )


def _depth_gauge(depths: dict[str, int]) -> Metric:
    depth = GaugeMetricFamily(
        "pipeline_queue_depth", "Messages waiting in a Redis list", labels=["queue"]
    )
    for queue, count in depths.items():
        depth.add_metric([queue], count)
    return depth
