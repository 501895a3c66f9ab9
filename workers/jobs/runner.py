"""Run one job once: under its lock, recorded in ``job_runs``, within its time budget.

``run_job(name, settings)`` is what the Celery tasks (scheduled by ``beat``) and the CLI
call. The lock is taken here, in the job's own call, so a run from the CLI and a run from
the schedule -- or the runs of two ``beat`` processes started by mistake -- never overlap:
the second one is skipped and says so.

When a job is due is decided here too, from ``job_runs``, not by ``beat``'s own schedule
file: ``beat`` keeps that file on local disk, and a platform that restarts its processes
daily (Heroku's dynos, every 24 h) would reset a daily job's clock every day, so it would
never run. ``beat`` asks at most every ``TICK_SECONDS``; a scheduled run
(``when_due=True``) goes ahead when the job's last successful run, on the database clock,
is older than its interval (less half a tick, so that a tick's jitter does not skip a
whole interval). The CLI always runs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import redis
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from config import logs
from config.settings import Settings
from schemas.vocabulary import JobName, JobOutcome
from workers import queue
from workers.db import settings_pool
from workers.faults import describe, where
from workers.jobs import metrics
from workers.jobs.drift import check_drift
from workers.jobs.lock import JobLock
from workers.jobs.redrive import accepted_grace, redrive
from workers.jobs.retention import apply_retention
from workers.jobs.verify import verify
from workers.jobs.voucherify_api import Budget, VoucherifyApi, sweep_reserve

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class JobSpec:
    name: str
    budget_seconds: int
    """How long one run may work; it stops between batches once this is spent."""
    run: Callable[[Settings, ConnectionPool, redis.Redis, float], dict[str, int]]
    interval: Callable[[Settings], int]
    """How often it should run (from the settings)."""

    @property
    def soft_time_limit(self) -> int:
        return self.budget_seconds + 30

    @property
    def time_limit(self) -> int:
        return self.budget_seconds + 60

    @property
    def lock_ttl_seconds(self) -> int:
        """Longer than any run can last (Celery kills it at ``time_limit``)."""
        return self.time_limit + 30


# Once settings, turned by nobody (issue 25): named constants of the jobs.
REDRIVE_MAX_ATTEMPTS = 5
"""Re-drives of one stuck event before it is dead-lettered with its last error."""
VERIFY_OVERLAP_SECONDS = 900
"""Each verify run lists again this much before its watermark (what Voucherify listed late)."""
VERIFY_BATCH_SIZE = 100
"""Failed-rollback and mismatch flags verify checks by id per run."""


def _redrive(s: Settings, pool: ConnectionPool, client: redis.Redis, deadline: float) -> Any:
    return redrive(
        pool,
        client,
        s.redrive_after_seconds,
        REDRIVE_MAX_ATTEMPTS,
        deadline,
        grace_seconds=accepted_grace(s.broker_visibility_timeout_seconds),
    ).as_dict()


def _api(s: Settings, pool: ConnectionPool) -> VoucherifyApi | None:
    """The API client verify and drift share (one budget), or None when not configured."""
    url, app_id, token = s.voucherify_api_url, s.voucherify_app_id, s.voucherify_app_token
    if not (url and app_id and token):
        return None
    budget = Budget(pool, s.voucherify_api_calls_per_minute, s.voucherify_api_calls_per_day)
    return VoucherifyApi(url, app_id, token, budget)


def _verify(s: Settings, pool: ConnectionPool, client: redis.Redis, deadline: float) -> Any:
    api = _api(s, pool)
    if api is None:
        raise RuntimeError("the verify job needs VOUCHERIFY_API_URL, _APP_ID and _APP_TOKEN")
    return verify(
        pool,
        api,
        s.verify_after_seconds,
        VERIFY_OVERLAP_SECONDS,
        VERIFY_BATCH_SIZE,
        deadline,
    ).as_dict()


def _drift(s: Settings, pool: ConnectionPool, client: redis.Redis, deadline: float) -> Any:
    """Heals drifting cards, and learns the holders of cards without one, from Voucherify's
    API when it is configured (as verify's), leaving the window sweep's share of the day's
    calls to verify."""
    api = _api(s, pool)
    if api is None:
        return check_drift(pool, deadline).as_dict()
    with api.leaving(sweep_reserve(api)):
        return check_drift(pool, deadline, api=api).as_dict()


def _retention(s: Settings, pool: ConnectionPool, client: redis.Redis, deadline: float) -> Any:
    return apply_retention(pool, s.retention_days, s.retention_event_ids_days, deadline).as_dict()


JOBS: dict[str, JobSpec] = {
    spec.name: spec
    for spec in (
        JobSpec(JobName.REDRIVE, 60, _redrive, lambda s: s.redrive_interval_seconds),
        JobSpec(JobName.VERIFY, 180, _verify, lambda s: s.verify_interval_seconds),
        JobSpec(JobName.DRIFT, 120, _drift, lambda s: s.drift_interval_seconds),
        JobSpec(JobName.RETENTION, 180, _retention, lambda s: s.retention_interval_seconds),
    )
}
JOB_NAMES = tuple(JOBS)
assert tuple(JobName) == JOB_NAMES, "every job has its JobName (the CLI's choices)"

START_RUN = "INSERT INTO job_runs (job, runner) VALUES (%(job)s, %(runner)s) RETURNING id"
FINISH_RUN = """
UPDATE job_runs SET outcome = %(outcome)s, finished_at = clock_timestamp(),
                    result = %(result)s::jsonb, error = %(error)s
WHERE id = %(id)s
"""
RECORD_SKIP = """
INSERT INTO job_runs (job, outcome, finished_at, runner)
VALUES (%(job)s, %(outcome)s, clock_timestamp(), %(runner)s)
"""

LAST_SUCCEEDED_WITHIN = """
SELECT EXISTS (
    SELECT 1 FROM job_runs
    WHERE job = %(job)s AND outcome = %(succeeded)s
      AND started_at > clock_timestamp() - make_interval(secs => %(seconds)s))
"""

DISABLED = "disabled"
"""``run_job``'s answer for a job its settings turn off: nothing ran, nothing is recorded."""
NOT_DUE = "not_due"
"""``run_job``'s answer to a scheduled run of a job that ran recently: nothing is recorded."""

TICK_SECONDS = 600
"""``beat`` asks every job at least this often whether it is due."""


def tick_seconds(spec: JobSpec, settings: Settings) -> int:
    """How often ``beat`` sends the job's task."""
    return min(spec.interval(settings), TICK_SECONDS)


def run_job(
    name: str, settings: Settings, *, when_due: bool = False, hard_limit: bool = False
) -> dict[str, Any]:
    """Run job ``name`` once; the answer says whether it ran, was skipped or failed.

    ``{"job", "status": "succeeded" | "failed" | "skipped" | "disabled" | "not_due",
    "result": {...}}`` (a ``JobOutcome``, ``DISABLED`` or ``NOT_DUE``: with ``when_due``,
    a job whose last successful run is more recent than its interval does not run),
    plus ``"error"`` when it failed. Never raises for a failing job: the error is logged
    and recorded in ``job_runs``, and the next scheduled run tries again. ``hard_limit``
    (a run by hand, outside Celery): the job's ``time_limit`` enforced here too.
    """
    spec = JOBS.get(name)
    if spec is None:
        raise ValueError(f"unknown job {name!r}; the jobs are {', '.join(JOB_NAMES)}")
    if name == "verify" and not settings.voucherify_api_enabled:
        log.info("job.disabled", extra={"job": name})
        return {"job": name, "status": DISABLED, "result": {}}
    database_url, redis_url = settings.database_url, settings.redis_url
    if database_url is None or redis_url is None:
        raise ValueError("run_job needs settings with both URLs resolved")
    pool = settings_pool(settings)
    client = queue.connect(redis_url, timeout=10)

    def work(deadline: float) -> dict[str, int]:
        return spec.run(settings, pool, client, deadline)

    due_within = spec.interval(settings) - tick_seconds(spec, settings) / 2 if when_due else None
    try:
        with time_limit(spec.time_limit if hard_limit else None):
            return run_locked(spec, work, pool, client, due_within)
    finally:
        client.close()


class JobTimeLimitExceeded(Exception):
    """A run by hand (``vfy-pipeline jobs run``) past the time limit beat's task has."""


@contextmanager
def time_limit(seconds: int | None) -> Iterator[None]:
    """Raise ``JobTimeLimitExceeded`` in this (main) thread after ``seconds``: a run by
    hand stops where Celery would kill the scheduled task, before its lock (``time_limit``
    + 30 s) expires, so beat never starts a second run beside it."""
    if seconds is None:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise JobTimeLimitExceeded(f"over the job's time limit of {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_locked(
    spec: JobSpec,
    work: Callable[[float], dict[str, int]],
    pool: ConnectionPool,
    client: redis.Redis,
    due_within: float | None = None,
) -> dict[str, Any]:
    """``work(deadline)`` under the job's lock, recorded; the edge where errors stop.

    With ``due_within`` (seconds), a job that succeeded that recently does not run.
    """
    runner = f"{socket.gethostname()}:{os.getpid()}"
    with logs.bind(job=spec.name):
        try:
            lock = JobLock(client, spec.name, spec.lock_ttl_seconds)
            acquired = lock.acquire()
        except redis.RedisError as exc:
            error = f"{type(exc).__name__}: {exc}"  # redis-py 8's repr() drops the message
            log.error("job.lock_unavailable", extra={"error": error})
            metrics.JOB_RUNS.labels(spec.name, JobOutcome.FAILED).inc()
            return {"job": spec.name, "status": JobOutcome.FAILED, "result": {}, "error": error}
        if not acquired:
            log.info("job.skipped", extra={"reason": "another run holds the lock"})
            metrics.JOB_RUNS.labels(spec.name, JobOutcome.SKIPPED).inc()
            skipped = {"job": spec.name, "outcome": JobOutcome.SKIPPED, "runner": runner}
            _record(pool, RECORD_SKIP, skipped)
            return {"job": spec.name, "status": JobOutcome.SKIPPED, "result": {}}
        try:
            if due_within is not None and _ran_within(pool, spec.name, due_within):
                log.debug("job.not_due")
                return {"job": spec.name, "status": NOT_DUE, "result": {}}
            return _run(spec, work, pool, runner)
        finally:
            lock.release_quietly()


def _ran_within(pool: ConnectionPool, job: str, seconds: float) -> bool:
    """Whether ``job`` succeeded in the last ``seconds``; when unsure, it is due."""
    try:
        with pool.connection(timeout=5) as conn:
            params = {"job": job, "succeeded": JobOutcome.SUCCEEDED, "seconds": seconds}
            row = conn.execute(LAST_SUCCEEDED_WITHIN, params).fetchone()
    except psycopg.Error as exc:  # the run itself will meet the same fault and record it
        log.warning("job.due_unknown", extra={"error": describe(exc)})
        return False
    return bool(row and row[0])


def _run(
    spec: JobSpec, work: Callable[[float], dict[str, int]], pool: ConnectionPool, runner: str
) -> dict[str, Any]:
    started = time.monotonic()
    run_id: int | None = None
    try:
        with pool.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            row = cursor.execute(START_RUN, {"job": spec.name, "runner": runner}).fetchone()
        run_id = int(row["id"]) if row else None
        result = work(started + spec.budget_seconds)
    except Exception as exc:  # noqa: BLE001 - the edge of a job run: record, log, retry later
        # A short class and message, as the worker records one (a message can quote a
        # payload or a card code): no traceback, no str(exc) of an unknown error.
        error = describe(exc)
        log.error("job.failed", extra={"error": error, "where": where(exc)})
        metrics.JOB_RUNS.labels(spec.name, JobOutcome.FAILED).inc()
        if run_id is not None:
            failed = {"outcome": JobOutcome.FAILED, "result": None, "error": error}
            _record(pool, FINISH_RUN, {"id": run_id, **failed})
        return {"job": spec.name, "status": JobOutcome.FAILED, "result": {}, "error": error}
    metrics.JOB_RUNS.labels(spec.name, JobOutcome.SUCCEEDED).inc()
    metrics.count(spec.name, result)
    succeeded = {"outcome": JobOutcome.SUCCEEDED, "result": json.dumps(result), "error": None}
    _record(pool, FINISH_RUN, {"id": run_id, **succeeded})
    log.info(
        "job.succeeded",
        extra={"result": result, "ms": round((time.monotonic() - started) * 1000, 1)},
    )
    return {"job": spec.name, "status": JobOutcome.SUCCEEDED, "result": result}


def _record(pool: ConnectionPool, query: str, params: dict[str, Any]) -> None:
    """Best effort: the record of a run must not turn a run's outcome into an error."""
    try:
        with pool.connection(timeout=5) as conn:
            conn.execute(query, params)
    except psycopg.Error as exc:
        log.warning("job.run_not_recorded", extra={"error": describe(exc)})
