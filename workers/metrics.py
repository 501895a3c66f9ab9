"""Prometheus metrics of the worker processes (see the README for how they are served)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram

from schemas.vocabulary import DeliveryOutcome
from workers.registry import registry

if TYPE_CHECKING:
    from workers.processing import Outcome

EVENTS = Counter(
    "worker_events_total", "Deliveries processed, by event type and outcome", ["type", "outcome"]
)
PROCESSING = Histogram(
    "worker_processing_seconds",
    "Time to apply one delivery (one transaction)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
)
LAG = Histogram(
    "worker_end_to_end_lag_seconds",
    "From the receiver's received-at to the commit of that delivery (every outcome, "
    "duplicates included: how far behind the workers are)",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)
RETRIES = Counter("worker_retries_total", "Transient failures that scheduled a retry")
DEAD_LETTERS = Counter("worker_dead_letters_total", "Deliveries dead-lettered", ["type"])
PARKED = Counter("worker_parked_total", "Deliveries parked in Redis because PostgreSQL was gone")


def type_label(event_type: str | None) -> str:
    """The ``type`` label: a type we handle, else ``other``. The sender chooses the type,
    so a label per type seen would let anyone with a signing secret grow the metrics
    without bound."""
    return event_type if event_type and registry.route(event_type) is not None else "other"


def observe_outcome(outcome: Outcome, received_at: str, elapsed: float) -> None:
    EVENTS.labels(type_label(outcome.type), outcome.status).inc()
    PROCESSING.observe(elapsed)
    if outcome.status == DeliveryOutcome.DEAD:
        DEAD_LETTERS.labels(type_label(outcome.type)).inc()
    try:
        lag = (datetime.now(UTC) - datetime.fromisoformat(received_at)).total_seconds()
    except ValueError:
        return
    LAG.observe(max(lag, 0.0))
