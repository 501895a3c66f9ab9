"""Prometheus metrics of the webhook (served by the web process's ``/metrics``).

``REQUESTS`` counts the answers of the webhook and of the ops routes (``web.app`` counts
the latter); it lives here because the receiver, below ``web``, counts its own. Under
gunicorn every update is a write to this process's metric file (multi-process mode), so the
webhook's path does the fewest: one counter child per status code, resolved once per
process (``answered``), and one histogram observation.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter(
    "receiver_requests_total",
    "Answers of the webhook and ops routes, by route (its template) and status code",
    ["path", "code"],
)
ACK_LATENCY = Histogram(
    "receiver_ack_seconds",
    "Time from request start to the webhook answer",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ENQUEUE_FAILURES = Counter(
    "receiver_enqueue_failures_total", "Deliveries answered 503 because the broker failed"
)

INVALID_SIGNATURES = Counter(
    "receiver_invalid_signatures_total", "Webhooks answered 401: no signature, or none matching"
)
UNPROCESSABLE = Counter(
    "receiver_unprocessable_total",
    "Signed bodies that break the body rule (not UTF-8, not a JSON object, too deep, NaN):"
    " answered 202 and enqueued for a dead letter",
)
REPEATS = Counter(
    "receiver_repeats_total",
    "Signed bodies of an event id accepted before: answered 202, nothing enqueued",
)

_answers: dict[tuple[str, int], Counter] = {}


def answered(path: str, code: int) -> None:
    """Count one answer ``code`` of route ``path`` (``REQUESTS``), without a labels() call
    per request once the pair was seen."""
    child = _answers.get((path, code))
    if child is None:
        child = _answers[(path, code)] = REQUESTS.labels(path, str(code))
    child.inc()
