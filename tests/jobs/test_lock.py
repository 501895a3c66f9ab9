"""One run of a job at a time: the Redis lock, and run_job / run_locked built on it."""

from __future__ import annotations

import dataclasses
import threading
from datetime import timedelta
from typing import Any

import psycopg
import redis
from psycopg_pool import ConnectionPool

from config.settings import Settings
from devtools.webhooks import wait_until
from tests.jobs.conftest import rows
from workers.celery_app import beat_schedule
from workers.jobs import JOBS, run_job
from workers.jobs.lock import LOCK_PREFIX, JobLock
from workers.jobs.runner import TICK_SECONDS, run_locked, time_limit


def test_a_second_holder_is_refused_until_the_first_releases(redis_client: redis.Redis) -> None:
    first, second = JobLock(redis_client, "t", 30), JobLock(redis_client, "t", 30)
    assert first.acquire()
    assert not second.acquire()
    assert 0 < int(redis_client.pttl(LOCK_PREFIX + "t")) <= 30_000  # it expires on its own
    assert first.release()
    assert second.acquire()
    assert second.release()


def test_an_expired_lock_taken_over_is_not_released_by_its_old_holder(
    redis_client: redis.Redis,
) -> None:
    old = JobLock(redis_client, "t", 0.2)
    assert old.acquire()
    new = JobLock(redis_client, "t", 30)
    wait_until(new.acquire, timeout=10, what="the old lock to expire")
    assert not old.release()  # compare-and-delete: the token is not ours any more
    assert redis_client.get(LOCK_PREFIX + "t") == new.token.encode()
    assert new.release()


def test_run_job_skips_while_another_run_holds_the_lock(
    settings: Settings, redis_client: redis.Redis, db: psycopg.Connection[Any]
) -> None:
    holder = JobLock(redis_client, "redrive", 60)
    assert holder.acquire()
    assert run_job("redrive", settings)["status"] == "skipped"
    assert holder.release()
    assert run_job("redrive", settings)["status"] == "succeeded"
    assert redis_client.get(LOCK_PREFIX + "redrive") is None  # released after the run
    assert rows(db, "SELECT job, outcome FROM job_runs ORDER BY id") == [
        ("redrive", "skipped"),
        ("redrive", "succeeded"),
    ]


def test_two_runs_at_once_one_works_and_the_other_is_skipped(
    pool: ConnectionPool, redis_url: str, db: psycopg.Connection[Any]
) -> None:
    spec = JOBS["drift"]
    inside, leave = threading.Event(), threading.Event()
    results: list[dict[str, Any]] = []

    def slow(deadline: float) -> dict[str, int]:
        inside.set()
        assert leave.wait(30)
        return {"cards": 1}

    def first_run() -> None:
        client = redis.Redis.from_url(redis_url)
        try:
            results.append(run_locked(spec, slow, pool, client))
        finally:
            client.close()

    thread = threading.Thread(target=first_run)
    thread.start()
    try:
        assert inside.wait(30)
        client = redis.Redis.from_url(redis_url)
        try:
            second = run_locked(spec, lambda deadline: {"cards": 2}, pool, client)
        finally:
            client.close()
    finally:
        leave.set()
        thread.join(30)
    assert second["status"] == "skipped"
    assert results == [{"job": "drift", "status": "succeeded", "result": {"cards": 1}}]
    assert rows(db, "SELECT outcome, result FROM job_runs ORDER BY started_at") == [
        ("succeeded", {"cards": 1}),
        ("skipped", None),
    ]


def test_a_failing_job_is_recorded_and_releases_its_lock(
    pool: ConnectionPool, redis_client: redis.Redis, db: psycopg.Connection[Any]
) -> None:
    def broken(deadline: float) -> dict[str, int]:
        raise RuntimeError("boom")

    answer = run_locked(JOBS["retention"], broken, pool, redis_client)
    assert answer["status"] == "failed"
    assert answer["error"] == "RuntimeError"  # a short class: a message can quote data
    assert rows(db, "SELECT outcome, error FROM job_runs") == [("failed", "RuntimeError")]
    assert redis_client.get(LOCK_PREFIX + "retention") is None


def test_verify_is_off_without_api_settings(settings: Settings) -> None:
    assert not settings.voucherify_api_enabled
    assert run_job("verify", settings) == {"job": "verify", "status": "disabled", "result": {}}


def test_a_scheduled_run_waits_for_the_interval_whatever_beats_own_clock_says(
    settings: Settings, db: psycopg.Connection[Any]
) -> None:
    # beat's schedule file resets when its process restarts (daily, on Heroku); the record
    # in job_runs does not: a scheduled run of a job that just succeeded does not run.
    daily = dataclasses.replace(settings, retention_interval_seconds=86400)
    assert run_job("retention", daily, when_due=True)["status"] == "succeeded"  # never ran
    assert run_job("retention", daily, when_due=True) == {
        "job": "retention",
        "status": "not_due",
        "result": {},
    }
    assert run_job("retention", daily)["status"] == "succeeded"  # the CLI always runs
    # A day later (less half a tick of beat's jitter), it is due again.
    db.execute("UPDATE job_runs SET started_at = started_at - interval '86100 seconds'")
    assert run_job("retention", daily, when_due=True)["status"] == "succeeded"
    assert rows(db, "SELECT outcome FROM job_runs ORDER BY id") == [("succeeded",)] * 3


def test_a_failed_run_does_not_count_as_done(
    settings: Settings, db: psycopg.Connection[Any]
) -> None:
    db.execute("INSERT INTO job_runs (job, outcome, finished_at) VALUES ('drift', 'failed', now())")
    assert run_job("drift", settings, when_due=True)["status"] == "succeeded"


def test_beat_asks_every_job_at_least_every_ten_minutes(settings: Settings) -> None:
    daily = dataclasses.replace(settings, retention_interval_seconds=86400)
    schedule = beat_schedule(daily)
    assert schedule["retention"]["schedule"] == timedelta(seconds=TICK_SECONDS)
    assert schedule["redrive"]["schedule"] == timedelta(seconds=settings.redrive_interval_seconds)
    assert schedule["retention"]["task"] == "voucherify.jobs.retention"
    assert "verify" not in schedule  # no API settings


def test_a_failed_run_records_a_short_class_never_the_message_or_a_traceback(
    pool: ConnectionPool, redis_client: redis.Redis, db: psycopg.Connection[Any]
) -> None:
    def crash(deadline: float) -> dict[str, int]:
        raise KeyError("card GIFT-4111-1111-1111 not found")  # a message that quotes data

    answer = run_locked(JOBS["drift"], crash, pool, redis_client)

    assert (answer["status"], answer["error"]) == ("failed", "KeyError")
    [(error,)] = rows(db, "SELECT error FROM job_runs WHERE outcome = 'failed'")
    assert error == "KeyError"
    assert redis_client.get(LOCK_PREFIX + "drift") is None


def test_a_run_by_hand_stops_at_the_jobs_time_limit_before_its_lock_expires(
    pool: ConnectionPool, redis_client: redis.Redis, db: psycopg.Connection[Any]
) -> None:
    spec = JOBS["drift"]
    assert spec.time_limit < spec.lock_ttl_seconds  # stopped while the lock still holds
    stopped = threading.Event()

    def endless(deadline: float) -> dict[str, int]:
        try:
            threading.Event().wait(30)  # longer than the (test's) limit
        finally:
            stopped.set()
        return {"cards": 0}

    with time_limit(1):
        answer = run_locked(spec, endless, pool, redis_client)

    assert stopped.is_set()
    assert (answer["status"], answer["error"]) == ("failed", "JobTimeLimitExceeded")
    assert rows(db, "SELECT outcome, error FROM job_runs") == [("failed", "JobTimeLimitExceeded")]
    assert redis_client.get(LOCK_PREFIX + "drift") is None  # released, not left to expire
