"""The inbox: each event applied once, duplicates recorded, bad input dead-lettered."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from devtools.servers import free_port
from devtools.webhooks import VOUCHERIFY, body_of, card_redemption, envelope, fixture
from workers.processing import TransientError, process_delivery


@pytest.fixture
def pool(database_url: str) -> Iterator[ConnectionPool]:
    with ConnectionPool(database_url, min_size=1, max_size=8, open=True) as pool:
        yield pool


def now() -> str:
    return datetime.now(UTC).isoformat()


def deliver(pool: ConnectionPool, document: dict[str, Any] | str, delivery_id: str = "") -> str:
    body = document if isinstance(document, str) else body_of(document).decode()
    return process_delivery(pool, body, delivery_id or uuid.uuid4().hex, now()).status


def event_row(db: psycopg.Connection[Any], event_id: str) -> tuple[Any, ...]:
    row = db.execute(
        "SELECT type, status, attempts, last_error FROM events WHERE event_id = %s", (event_id,)
    ).fetchone()
    assert row is not None
    return tuple(row)


def test_an_event_is_processed_and_its_delivery_recorded(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    doc = envelope("redemption.succeeded", fixture("redemption.succeeded"), event_id="evred_1")
    assert deliver(pool, doc, "d1") == "processed"
    assert event_row(db, "evred_1") == ("redemption.succeeded", "processed", 1, None)
    deliveries = db.execute("SELECT delivery_id, outcome FROM deliveries").fetchall()
    assert deliveries == [("d1", "processed")]
    payload = db.execute("SELECT payload FROM events").fetchone()
    assert payload is not None
    assert payload[0] == doc


def test_a_duplicate_delivery_is_recorded_and_not_applied_again(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    data = card_redemption("gift", "r_dup", amount=1500, balance_after=8500)
    doc = envelope("redemption.succeeded", data, event_id="evred_dup")
    assert deliver(pool, doc, "d1") == "processed"
    # Voucherify retries send a new envelope id with the same event id.
    again = {**doc, "id": "whs_other"}
    assert deliver(pool, again, "d2") == "duplicate"
    assert db.execute("SELECT count(*) FROM ledger_entries").fetchone() == (1,)
    outcomes = db.execute("SELECT delivery_id, outcome FROM deliveries ORDER BY 1").fetchall()
    assert outcomes == [("d1", "processed"), ("d2", "duplicate")]


def test_the_same_delivery_redelivered_by_the_broker_is_idempotent(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    doc = envelope("redemption.succeeded", fixture("redemption.succeeded"), event_id="evred_2")
    assert deliver(pool, doc, "d1") == "processed"
    assert deliver(pool, doc, "d1") == "duplicate"
    assert db.execute("SELECT count(*) FROM deliveries").fetchone() == (1,)


def test_five_concurrent_deliveries_of_one_event_apply_it_once_and_keep_five_delivery_ids(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    data = card_redemption("loyalty", "r_conc", amount=40, balance_after=960)
    doc = envelope("redemption.succeeded", data, event_id="evred_conc")
    barrier = threading.Barrier(5)
    outcomes: list[str] = []

    def one(i: int) -> None:
        barrier.wait()
        outcomes.append(deliver(pool, {**doc, "id": f"whs_{i}"}, f"d{i}"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["duplicate"] * 4 + ["processed"]
    assert db.execute("SELECT count(*) FROM ledger_entries").fetchone() == (1,)
    ids = db.execute("SELECT delivery_id FROM deliveries WHERE event_id = 'evred_conc'").fetchall()
    assert sorted(r[0] for r in ids) == [f"d{i}" for i in range(5)]


def test_an_unhandled_type_is_stored_and_ignored(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    doc = envelope("voucher.published", {"voucher": {"id": "v_1"}}, event_id="evvou_1")
    assert deliver(pool, doc) == "ignored"
    assert event_row(db, "evvou_1") == ("voucher.published", "ignored", 1, None)


def test_a_payload_that_fails_validation_is_dead_lettered_and_the_next_event_goes_through(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    bad = fixture("redemption.succeeded")
    bad["redemption"]["amount"] = "a lot"
    assert deliver(pool, envelope("redemption.succeeded", bad, event_id="ev_bad")) == "dead"
    good = envelope("redemption.succeeded", fixture("redemption.succeeded"), event_id="ev_good")
    assert deliver(pool, good) == "processed"

    type_, status, attempts, error = event_row(db, "ev_bad")
    assert (type_, status, attempts) == ("redemption.succeeded", "dead", 1)
    assert "amount" in error
    letters = db.execute("SELECT event_id, type, reason FROM dead_letters").fetchall()
    assert len(letters) == 1
    assert letters[0][:2] == ("ev_bad", "redemption.succeeded")
    assert "Not a valid integer" in letters[0][2]
    # A later delivery of the same dead event is a duplicate, not a second dead letter.
    assert deliver(pool, envelope("redemption.succeeded", bad, event_id="ev_bad")) == "duplicate"
    assert db.execute("SELECT count(*) FROM dead_letters").fetchone() == (1,)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("[1, 2]", "not a JSON object"),
        (json.dumps({"data": {}, "type": "redemption.succeeded"}), "no event.id"),
        (json.dumps({"id": "whs_1", "data": {}}), "no event.type"),
    ],
)
def test_bodies_that_cannot_be_keyed_or_typed_are_dead_lettered_with_the_reason(
    pool: ConnectionPool, db: psycopg.Connection[Any], body: str, reason: str
) -> None:
    assert deliver(pool, body, "d_odd") == "dead"
    row = db.execute("SELECT reason FROM dead_letters").fetchone()
    assert row is not None
    assert reason in row[0]


def test_the_legacy_format_is_dead_lettered_with_a_clear_reason(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    body = (VOUCHERIFY / "legacy-v2018-08-01.redemption.succeeded.example.json").read_text()
    assert deliver(pool, body) == "dead"
    row = db.execute("SELECT reason FROM dead_letters").fetchone()
    assert row is not None
    assert "v2018-08-01" in row[0]


def test_values_postgresql_refuses_are_dead_lettered_not_retried(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    data = fixture("redemption.succeeded")
    data["redemption"]["id"] = "r_\u0000nul"
    assert deliver(pool, envelope("redemption.succeeded", data, event_id="ev_nul")) == "dead"
    row = db.execute("SELECT reason FROM dead_letters").fetchone()
    assert row is not None
    assert "rejected by the database" in row[0]


def test_an_unreachable_database_is_a_transient_error() -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    with ConnectionPool(url, min_size=0, max_size=1, timeout=1, open=True) as pool:
        doc = envelope("redemption.succeeded", fixture("redemption.succeeded"))
        with pytest.raises(TransientError):
            process_delivery(pool, body_of(doc).decode(), "d1", now())


def test_effects_and_the_processed_mark_commit_together(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    """A handler failing half-way leaves neither its first writes nor the mark behind."""
    from workers.registry import Registry

    routes = Registry()

    def half_then_boom(event: Any, conn: psycopg.Connection[Any]) -> None:
        conn.execute("INSERT INTO orders (order_id, status) VALUES ('ord_half', 'PAID')")
        raise psycopg.OperationalError("connection lost mid-transaction")

    routes.handles("redemption.succeeded", lambda *args: args)(half_then_boom)
    doc = envelope("redemption.succeeded", fixture("redemption.succeeded"), event_id="ev_half")
    with pytest.raises(TransientError):
        process_delivery(pool, body_of(doc).decode(), "d1", now(), routes=routes)
    assert db.execute("SELECT count(*) FROM orders").fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM events").fetchone() == (0,)
