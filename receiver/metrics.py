"""Prometheus metrics of the web process.

Under gunicorn, ``PROMETHEUS_MULTIPROC_DIR`` is set (see ``config/gunicorn.py``) and every
worker process writes to its own files in it; ``/metrics`` aggregates them. Without it
(tests, the Flask dev server) the default per-process registry is used.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.registry import Collector

REQUESTS = Counter(
    "receiver_requests_total", "Webhook receiver answers by path and status code", ["path", "code"]
)
ACK_LATENCY = Histogram(
    "receiver_ack_seconds",
    "Time from request start to the webhook answer",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ENQUEUE_FAILURES = Counter(
    "receiver_enqueue_failures_total", "Deliveries answered 503 because the broker failed"
)


def render(extra: Iterable[Collector] = ()) -> tuple[bytes, str]:
    """The process's (or all gunicorn workers') metrics, then those of ``extra`` collectors
    (the ``pipeline_*`` gauges of ``ops.gauges``, read when scraped)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        payload = generate_latest(registry)
    else:
        payload = generate_latest()
    collectors = list(extra)
    if collectors:
        scraped = CollectorRegistry(auto_describe=False)
        for collector in collectors:
            scraped.register(collector)
        payload += generate_latest(scraped)
    return payload, CONTENT_TYPE_LATEST
