"""Prometheus metrics of the reconciliation jobs (served like the workers' own metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

JOB_RUNS = Counter(
    "reconciliation_job_runs_total",
    "Runs of the reconciliation jobs, by job and outcome (succeeded, failed, skipped)",
    ["job", "outcome"],
)
JOB_ITEMS = Counter(
    "reconciliation_job_items_total",
    "What the jobs did, by job and action (redriven, dead_lettered, applied, deleted, ...)",
    ["job", "action"],
)
DRIFTING_CARDS = Gauge(
    "reconciliation_drifting_cards",
    "Cards whose reported balance differs from what the ledger implies, at the last drift run",
    ["kind"],
    multiprocess_mode="mostrecent",  # the worker's pool children: the latest run's figure
)
DRIFT_FLAGS = Counter(
    "reconciliation_drift_flags_raised_total",
    "Drift flags raised (one open flag per card at a time)",
    ["kind"],
)
VOUCHERIFY_API_REQUESTS = Counter(
    "voucherify_api_requests_total",
    "Calls the jobs made to Voucherify's API, by HTTP status ('error': no answer)",
    ["status"],
)
VOUCHERIFY_API_SKIPPED = Counter(
    "voucherify_api_calls_skipped_total",
    "Calls to Voucherify's API not made for budget, by reason (day, minute, rate_limit_headers)",
    ["reason"],
)


def count(job: str, result: dict[str, int]) -> None:
    for action, n in result.items():
        if n:
            JOB_ITEMS.labels(job, action).inc(n)
