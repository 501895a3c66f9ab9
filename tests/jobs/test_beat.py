"""Two ``beat`` processes started by mistake: every job still runs one at a time.

A real worker and two real ``celery beat`` processes on a one-second schedule; the runs
recorded in ``job_runs`` (database clock) must never overlap for one job.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from psycopg_pool import ConnectionPool

from devtools.webhooks import body_of, card_redemption, envelope, wait_until
from tests.conftest import Processes, process_env
from tests.jobs.conftest import rows, scalar
from workers import processing
from workers.jobs.lock import JobLock

pytestmark = pytest.mark.e2e


def test_two_beats_never_run_a_job_twice_at_once_and_a_stuck_event_heals(
    processes: Processes,
    database_url: str,
    redis_url: str,
    redis_client: redis.Redis,
    pool: ConnectionPool,
    db: psycopg.Connection[Any],
    tmp_path: Path,
) -> None:
    # An event a worker gave up on (its message is gone): the re-drive job must bring it back.
    data = card_redemption("gift", "r_beat", amount=2000, balance_after=8000)
    body = body_of(envelope("redemption.succeeded", data, event_id="ev_beat")).decode()
    processing.record_failure(
        pool, body, uuid.uuid4().hex, datetime.now(UTC).isoformat(), "OperationalError: gone"
    )
    db.execute("UPDATE events SET updated_at = now() - interval '1 hour'")

    env = process_env(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        REDRIVE_INTERVAL_SECONDS="1",
        REDRIVE_AFTER_SECONDS="1",
        DRIFT_INTERVAL_SECONDS="1",
    )
    # A run of the re-drive job is in progress elsewhere (the CLI, say): it holds the lock.
    elsewhere = JobLock(redis_client, "redrive", ttl_seconds=300)
    assert elsewhere.acquire()
    processes.worker(env, concurrency=4)
    processes.beat(env, tmp_path / "beat-a")
    processes.beat(env, tmp_path / "beat-b")

    def skipped() -> bool:
        return bool(
            scalar(
                db,
                "SELECT count(*) >= 3 FROM job_runs WHERE job = 'redrive' AND outcome = 'skipped'",
            )
        )

    wait_until(skipped, timeout=90, what="scheduled re-drive runs skipped while the lock is held")
    assert rows(db, "SELECT DISTINCT job, outcome FROM job_runs WHERE job = 'redrive'") == [
        ("redrive", "skipped")
    ]
    assert scalar(db, "SELECT status FROM events") == "failed"
    assert elsewhere.release()

    def processed() -> bool:
        return bool(scalar(db, "SELECT status = 'processed' FROM events"))

    wait_until(processed, timeout=90, what="the stuck event re-driven and processed")

    def enough_runs() -> bool:
        counts = dict(rows(db, "SELECT job, count(*) FROM job_runs GROUP BY job"))
        return counts.get("redrive", 0) >= 8 and counts.get("drift", 0) >= 8

    wait_until(enough_runs, timeout=90, what="several runs of each job")
    processes.stop_all()

    overlapping = rows(
        db,
        "SELECT a.job, a.id, b.id FROM job_runs a JOIN job_runs b"
        " ON a.job = b.job AND a.id < b.id"
        " WHERE a.outcome = 'succeeded' AND b.outcome = 'succeeded'"
        " AND tstzrange(a.started_at, a.finished_at) && tstzrange(b.started_at, b.finished_at)",
    )
    assert overlapping == [], processes.logs()
    assert rows(db, "SELECT DISTINCT outcome FROM job_runs WHERE outcome = 'failed'") == []
    assert rows(db, "SELECT redemption_id, effect FROM ledger_entries") == [("r_beat", "debit")]
