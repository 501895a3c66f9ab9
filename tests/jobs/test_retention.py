"""Retention: old settled deliveries and bodies go, event ids stay for dedup, the rest stays."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from devtools.webhooks import body_of, card_redemption, envelope, fixture
from tests.conftest import deliver
from tests.jobs.conftest import rows
from workers import processing
from workers.jobs.retention import RetentionResult, apply_retention


def days_ago(days: int) -> str:
    return (datetime.now(UTC) - timedelta(days=days)).isoformat()


def run(pool: ConnectionPool, batch_size: int = 1000) -> RetentionResult:
    return apply_retention(pool, 30, 90, time.monotonic() + 60, batch_size=batch_size)


def last_seen(db: psycopg.Connection[Any], event_id: str, days: int) -> None:
    db.execute(
        "UPDATE events SET updated_at = now() - make_interval(days => %s) WHERE event_id = %s",
        (days, event_id),
    )


def state(db: psycopg.Connection[Any]) -> dict[str, tuple[str, bool, int]]:
    """event id -> (status, body kept, deliveries kept)."""
    return {
        r[0]: (r[1], r[2], r[3])
        for r in rows(
            db,
            "SELECT e.event_id, e.status, e.payload IS NOT NULL,"
            " (SELECT count(*) FROM deliveries d WHERE d.event_id = e.event_id)::int"
            " FROM events e",
        )
    }


def test_retention_prunes_what_is_old_and_settled_and_nothing_else(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    def redemption(n: str) -> dict[str, Any]:
        return card_redemption("gift", f"r_{n}", 100, 900, order_id=f"ord_{n}")

    # Settled 40 days ago: deliveries and body go, the id stays (dedup).
    deliver(pool, "redemption.succeeded", redemption("old"), "ev_old", days_ago(40))
    deliver(pool, "redemption.succeeded", redemption("old"), "ev_old", days_ago(39))
    last_seen(db, "ev_old", 39)
    # Ignored 100 days ago and not seen since: the row goes too.
    deliver(
        pool,
        "customer.order.created",
        fixture("customer.order.created"),
        "ev_ancient",
        days_ago(100),
    )
    last_seen(db, "ev_ancient", 100)
    # Recent: untouched.
    deliver(pool, "redemption.succeeded", redemption("new"), "ev_new", days_ago(10))
    # Dead 40 days ago, dead letter not replayed: the body is what a replay needs.
    deliver(pool, "redemption.succeeded", {"redemption": {}}, "ev_dead", days_ago(40))
    last_seen(db, "ev_dead", 100)
    # Failed 40 days ago: the re-drive job's, never retention's.
    body = body_of(envelope("redemption.succeeded", redemption("stuck"), "ev_stuck")).decode()
    processing.record_failure(pool, body, uuid.uuid4().hex, days_ago(40), "boom")
    last_seen(db, "ev_stuck", 100)

    result = run(pool)

    assert result == RetentionResult(
        deliveries_deleted=3, bodies_pruned=1, events_deleted=1, complete=1
    )
    assert state(db) == {
        "ev_old": ("processed", False, 0),
        "ev_new": ("processed", True, 1),
        "ev_dead": ("dead", True, 1),
        "ev_stuck": ("failed", True, 1),
    }
    assert rows(db, "SELECT event_id FROM dead_letters") == [("ev_dead",)]
    # Harmless twice.
    assert run(pool) == RetentionResult(complete=1)
    # The id kept is still a duplicate for a late re-send: nothing applied twice.
    assert deliver(pool, "redemption.succeeded", redemption("old"), "ev_old") == "duplicate"


def test_replayed_dead_letters_let_their_event_go(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    deliver(pool, "redemption.succeeded", {"redemption": {}}, "ev_dead", days_ago(40))
    db.execute("UPDATE dead_letters SET replayed_at = now()")
    assert run(pool) == RetentionResult(deliveries_deleted=1, bodies_pruned=1, complete=1)


def test_work_is_done_in_bounded_batches(pool: ConnectionPool, db: psycopg.Connection[Any]) -> None:
    for n in range(5):
        deliver(
            pool,
            "redemption.succeeded",
            card_redemption("gift", f"r_{n}", 100, 900),
            f"ev_{n}",
            days_ago(40),
        )
    assert run(pool, batch_size=2) == RetentionResult(
        deliveries_deleted=5, bodies_pruned=5, complete=1
    )
