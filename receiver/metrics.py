"""Prometheus metrics of the webhook view (served by the web process's ``/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

ACK_LATENCY = Histogram(
    "receiver_ack_seconds",
    "Time from request start to the webhook answer",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ENQUEUE_FAILURES = Counter(
    "receiver_enqueue_failures_total", "Deliveries answered 503 because the broker failed"
)
