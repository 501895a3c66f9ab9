"""The inbox: each event applied once, duplicates recorded, bad input dead-lettered."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from devtools.servers import free_port
from devtools.webhooks import VOUCHERIFY, body_of, card_redemption, card_rollback, envelope, fixture
from workers.faults import TransientError
from workers.processing import Outcome, Result, process_batch, process_delivery, record_failure
from workers.registry import Handler, Registry


@pytest.fixture
def pool(database_url: str) -> Iterator[ConnectionPool]:
    with ConnectionPool(database_url, min_size=1, max_size=8, open=True) as pool:
        yield pool


def now() -> str:
    return datetime.now(UTC).isoformat()


def deliver(pool: ConnectionPool, document: dict[str, Any] | str, delivery_id: str = "") -> str:
    body = document if isinstance(document, str) else body_of(document).decode()
    return process_delivery(pool, body, delivery_id or uuid.uuid4().hex, now()).status


def routes_to(handler: Handler) -> Registry:
    """A registry that hands every redemption.succeeded, unloaded, to ``handler``."""
    routes = Registry()
    routes.handles("redemption.succeeded", lambda *args: args)(handler)
    return routes


def routes_running(statement: str, value: str) -> Registry:
    """A registry whose redemption.succeeded handler runs ``statement`` with ``value`` as
    ``%(v)s``."""

    def run(event: Any, conn: psycopg.Connection[Any]) -> None:
        conn.execute(statement, {"v": value})

    return routes_to(run)


def redemption_succeeded(event_id: str | None = None, **changes: Any) -> dict[str, Any]:
    """The published redemption.succeeded webhook, with ``changes`` to its redemption."""
    data = fixture("redemption.succeeded")
    data["redemption"].update(changes)
    return envelope("redemption.succeeded", data, event_id=event_id)


def dead_letter_reason(db: psycopg.Connection[Any]) -> str:
    row = db.execute("SELECT reason FROM dead_letters").fetchone()
    assert row is not None
    return str(row[0])


def event_row(db: psycopg.Connection[Any], event_id: str) -> tuple[Any, ...]:
    row = db.execute(
        "SELECT type, status, attempts, last_error FROM events WHERE event_id = %s", (event_id,)
    ).fetchone()
    assert row is not None
    return tuple(row)


def test_an_event_is_processed_and_its_delivery_recorded(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    doc = redemption_succeeded("evred_1")
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
    doc = redemption_succeeded("evred_2")
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
    assert deliver(pool, redemption_succeeded("ev_bad", amount="a lot")) == "dead"
    good = redemption_succeeded("ev_good")
    assert deliver(pool, good) == "processed"

    type_, status, attempts, error = event_row(db, "ev_bad")
    assert (type_, status, attempts) == ("redemption.succeeded", "dead", 1)
    assert "amount" in error
    letters = db.execute("SELECT event_id, type, reason FROM dead_letters").fetchall()
    assert len(letters) == 1
    assert letters[0][:2] == ("ev_bad", "redemption.succeeded")
    assert "Not a valid integer" in letters[0][2]
    # A later delivery of the same dead event is a duplicate, not a second dead letter.
    assert deliver(pool, redemption_succeeded("ev_bad", amount="a lot")) == "duplicate"
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
    assert reason in dead_letter_reason(db)


def test_the_legacy_format_is_dead_lettered_with_a_clear_reason(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    body = (VOUCHERIFY / "legacy-v2018-08-01.redemption.succeeded.example.json").read_text()
    assert deliver(pool, body) == "dead"
    assert "v2018-08-01" in dead_letter_reason(db)


def test_a_nul_in_a_string_is_applied_as_a_replacement_character_with_the_body_kept(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    """Valid JSON that jsonb refuses (a \\u0000 escape): the event is applied, its typed
    columns get U+FFFD for the NUL, and its body is kept byte for byte as text."""
    document = redemption_succeeded("ev_nul", id="r_\u0000nul")
    assert deliver(pool, document) == "processed"
    assert db.execute("SELECT redemption_id FROM redemptions").fetchall() == [("r_\ufffdnul",)]
    kept = db.execute("SELECT payload IS NULL, raw_body FROM events").fetchone()
    assert kept == (True, body_of(document).decode())
    assert db.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)


def test_an_unreachable_database_is_a_transient_error() -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    with ConnectionPool(url, min_size=0, max_size=1, timeout=1, open=True) as pool:
        doc = redemption_succeeded()
        with pytest.raises(TransientError):
            process_delivery(pool, body_of(doc).decode(), "d1", now())


def test_effects_and_the_processed_mark_commit_together(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    """A handler failing half-way leaves neither its first writes nor the mark behind."""

    def half_then_boom(event: Any, conn: psycopg.Connection[Any]) -> None:
        conn.execute("INSERT INTO orders (order_id, status) VALUES ('ord_half', 'PAID')")
        raise psycopg.OperationalError("connection lost mid-transaction")

    doc = redemption_succeeded("ev_half")
    with pytest.raises(TransientError):
        process_delivery(pool, body_of(doc).decode(), "d1", now(), routes=routes_to(half_then_boom))
    assert db.execute("SELECT count(*) FROM orders").fetchone() == (0,)
    assert db.execute("SELECT count(*) FROM events").fetchone() == (0,)


# --- hostile input: every delivery ends final and visible, with a short reason ---------


def inbox(db: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    """Every event: id, type, status, whether the body is in payload, the body as text."""
    query = "SELECT event_id, type, status, payload IS NOT NULL, raw_body FROM events ORDER BY 1"
    return db.execute(query).fetchall()


def dead_letters(db: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    query = "SELECT event_id, delivery_id, type, reason FROM dead_letters ORDER BY id"
    return db.execute(query).fetchall()


def hostile(event_id: str, event_type: str = "redemption.succeeded") -> str:
    """A well-formed v2024-01-01 body around a hostile event id or type (valid JSON)."""
    doc = envelope(event_type, fixture("redemption.succeeded"), event_id=event_id)
    return body_of(doc).decode()


def test_a_lone_surrogate_in_the_event_id_is_a_dead_letter_under_a_sanitised_id_beside_the_raw_body(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    body = hostile("ev_\ud800_x")
    assert "\\ud800" in body  # a JSON escape: the body is ASCII, the parsed id is not UTF-8

    outcome = process_delivery(pool, body, "d_surrogate", now())

    assert outcome.status == "dead"
    assert outcome.reason == "not storable: the event id holds a lone surrogate"
    [(event_id, type_, status, in_jsonb, raw_body)] = inbox(db)
    assert event_id == outcome.event_id
    assert event_id.startswith("ev_\ufffd_x~")  # replaced, and a hash keeps it distinct
    assert (type_, status) == ("redemption.succeeded", "dead")
    # jsonb refuses the escape itself: the body is kept as text, byte for byte.
    assert (in_jsonb, raw_body) == (False, body)
    assert dead_letters(db) == [(event_id, "d_surrogate", "redemption.succeeded", outcome.reason)]
    # A later delivery of the same body finds the same sanitised event: a duplicate.
    assert process_delivery(pool, body, "d_surrogate_2", now()).status == "duplicate"
    assert len(dead_letters(db)) == 1


@pytest.mark.parametrize(
    ("event_id", "event_type", "reason"),
    [
        ("ev_\x00nul", "redemption.succeeded", "the event id holds a NUL character"),
        ("ev_" + "x" * 3000, "redemption.succeeded", "the event id is over 255 characters"),
        ("ev_ok_type", "redemption.\udc80", "the event type holds a lone surrogate"),
        ("ev_ok_type2", "t" * 400, "the event type is over 255 characters"),
    ],
)
def test_ids_that_cannot_be_stored_are_stored_sanitised_and_dead_lettered_at_once(
    pool: ConnectionPool, db: psycopg.Connection[Any], event_id: str, event_type: str, reason: str
) -> None:
    body = hostile(event_id, event_type)

    outcome = process_delivery(pool, body, "d_bad_id", now())

    assert (outcome.status, outcome.reason) == ("dead", f"not storable: {reason}")
    [(stored_id, stored_type, status, _, _)] = inbox(db)
    assert status == "dead"
    assert len(stored_id) <= 255
    assert len(stored_type) <= 255
    assert "\x00" not in stored_id + stored_type
    assert stored_id.encode() + stored_type.encode()  # raises on a lone surrogate
    kept = db.execute("SELECT coalesce(payload::text, raw_body) FROM events").fetchone()
    assert kept is not None
    assert kept[0] is not None  # the raw body is kept
    assert [r[0] for r in dead_letters(db)] == [stored_id]


def test_two_long_event_ids_with_one_prefix_stay_two_events(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    prefix = "ev_" + "p" * 300
    assert deliver(pool, hostile(prefix + "_one")) == "dead"
    assert deliver(pool, hostile(prefix + "_two")) == "dead"
    ids = [r[0] for r in inbox(db)]
    assert len(set(ids)) == 2
    assert all(len(i) <= 255 for i in ids)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_dead_letters_with_the_body_kept_as_text(
    pool: ConnectionPool, db: psycopg.Connection[Any], constant: str
) -> None:
    body = hostile("ev_nan").replace('"amount":', f'"amount":{constant},"was":', 1)
    assert json.loads(body)  # Python's json takes it; PostgreSQL's jsonb does not

    outcome = process_delivery(pool, body, "d_nan", now())

    assert outcome.status == "dead"
    assert outcome.reason == "rejected by the database: SQLSTATE 22P02 (class 22, data exception)"
    assert inbox(db) == [("ev_nan", "redemption.succeeded", "dead", False, body)]
    assert [r[3] for r in dead_letters(db)] == [outcome.reason]


def nested(depth: int) -> str:
    """A v2024-01-01 body whose ``data.redemption.metadata`` nests ``depth`` lists deep."""
    body = hostile("ev_deep")
    return body.replace('"metadata":', '"metadata":' + "[" * depth + "]" * depth + ',"was":', 1)


def test_a_body_nested_deeper_than_the_limit_is_a_dead_letter_whatever_the_stack(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    body = nested(900)  # within what the receiver's json.loads takes
    outcome = process_delivery(pool, body, "d_deep", now())

    assert outcome.status == "dead"
    assert outcome.reason == "not storable: JSON nested over 64 levels deep"
    [(event_id, _, status, in_jsonb, raw_body)] = inbox(db)
    assert (event_id, status) == ("ev_deep", "dead")
    assert (in_jsonb, raw_body) == (False, body)  # never jsonb: others would parse it again


def test_a_body_nested_too_deep_for_pythons_json_is_a_dead_letter_not_a_crash(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    body = nested(100_000)  # RecursionError in json.loads, stack depth limit in PostgreSQL
    outcome = process_delivery(pool, body, "d_deeper", now())

    assert outcome.status == "dead"
    assert outcome.reason == "not storable: JSON nested over 64 levels deep"
    # No event id could be read: the event is keyed by its delivery, its body kept as text.
    assert inbox(db) == [("delivery:d_deeper", "", "dead", False, body)]


def test_an_id_too_long_for_a_btree_index_is_a_dead_letter_not_a_transient_fault(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    long_id = "".join(uuid.uuid4().hex for _ in range(200))  # incompressible
    doc = redemption_succeeded("ev_long_key", id=long_id)

    outcome = process_delivery(pool, body_of(doc).decode(), "d_long_key", now())

    assert outcome.status == "dead"
    assert outcome.reason == (
        "rejected by the database: SQLSTATE 54000 (class 54, program limit exceeded)"
    )
    assert event_row(db, "ev_long_key")[1:] == ("dead", 1, outcome.reason)
    assert db.execute("SELECT count(*) FROM redemptions").fetchone() == (0,)


def test_the_reason_names_the_sqlstate_never_the_servers_text_or_the_payload(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    routes = routes_running("SELECT %(v)s::integer", "card 4111 1111 1111 1111")
    outcome = process_delivery(pool, hostile("ev_cast"), "d_cast", now(), routes=routes)

    reason = "rejected by the database: SQLSTATE 22P02 (class 22, data exception)"
    assert (outcome.status, outcome.reason) == ("dead", reason)
    assert event_row(db, "ev_cast") == ("redemption.succeeded", "dead", 1, reason)
    assert [r[3] for r in dead_letters(db)] == [reason]


def test_a_lone_surrogate_a_handler_writes_is_stored_as_a_replacement_character(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    routes = routes_running("INSERT INTO orders (order_id) VALUES (%(v)s)", "r_\udfff")
    outcome = process_delivery(pool, hostile("ev_write"), "d_write", now(), routes=routes)

    assert outcome.status == "processed"
    assert db.execute("SELECT order_id FROM orders").fetchall() == [("r_\ufffd",)]
    assert dead_letters(db) == []


@pytest.mark.parametrize("final", ["processed", "ignored", "dead"])
def test_a_later_delivery_failing_at_the_claim_never_changes_a_final_event(
    pool: ConnectionPool, db: psycopg.Connection[Any], final: str
) -> None:
    event_type = {"processed": "redemption.succeeded", "ignored": "voucher.published"}.get(
        final, "redemption.succeeded"
    )
    data = fixture("redemption.succeeded")
    if final == "dead":
        data["redemption"]["amount"] = "a lot"
    first = envelope(event_type, data, event_id="ev_final")
    assert deliver(pool, first, "d_first") == final
    before = db.execute("SELECT status, last_error, processed_at FROM events").fetchone()
    letters = dead_letters(db)
    # The same event id, a body PostgreSQL's jsonb refuses: the claim itself fails.
    again = body_of(first).decode().replace('"project_id":', '"x":NaN,"project_id":', 1)

    outcome = process_delivery(pool, again, "d_again", now())

    assert outcome.status == "duplicate"
    assert db.execute("SELECT status, last_error, processed_at FROM events").fetchone() == before
    assert dead_letters(db) == letters
    outcomes = db.execute("SELECT delivery_id, outcome FROM deliveries ORDER BY 1").fetchall()
    assert outcomes == [("d_again", "duplicate"), ("d_first", final)]


# --- recording a failure never raises ---------------------------------------------------


def test_recording_a_failure_of_a_lone_surrogate_id_never_raises_and_keeps_the_body(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    body = hostile("ev_\ud800")

    assert record_failure(pool, body, "d_fail", now(), "OperationalError: gone") is True

    [(event_id, _, status, in_jsonb, raw_body)] = inbox(db)
    assert event_id.startswith("ev_\ufffd~")
    assert (status, in_jsonb, raw_body) == ("failed", False, body)
    assert db.execute("SELECT outcome FROM deliveries").fetchall() == [("failed",)]


@pytest.mark.parametrize(
    "body",
    [
        hostile("ev_nan_fail").replace('"project_id":', '"x":NaN,"project_id":', 1),
        nested(100_000),
        "not json at all \x00",
    ],
    ids=["nan", "deep", "nul-in-text"],
)
def test_recording_a_failure_of_a_malformed_body_never_raises(
    pool: ConnectionPool, db: psycopg.Connection[Any], body: str
) -> None:
    assert record_failure(pool, body, "d_malformed", now(), "SoftTimeLimitExceeded: ") is True
    assert [r[2] for r in inbox(db)] == ["failed"]


def test_recording_a_failure_of_a_final_event_is_a_duplicate_and_keeps_its_status(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    doc = redemption_succeeded("ev_done")
    assert deliver(pool, doc, "d_done") == "processed"

    assert record_failure(pool, body_of(doc).decode(), "d_late", now(), "boom") is True

    assert event_row(db, "ev_done") == ("redemption.succeeded", "processed", 1, None)
    outcomes = db.execute("SELECT delivery_id, outcome FROM deliveries ORDER BY 1").fetchall()
    assert outcomes == [("d_done", "processed"), ("d_late", "duplicate")]


def test_recording_a_failure_without_a_database_answers_false() -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    with ConnectionPool(url, min_size=0, max_size=1, timeout=1, open=True) as pool:
        assert record_failure(pool, nested(100_000), "d1", now(), "boom") is False


def test_an_amount_whose_negation_bigint_cannot_hold_is_a_dead_letter_at_once(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    # -2**63 is a valid int64, but its restore (+2**63) is not: found by the published-schema
    # property test. A dead letter with its reason, first attempt, and the next event applies.
    data = card_rollback("gift", "r_min", "rr_min", amount=1, balance_after=0)
    data["redemption_rollback"]["amount"] = -(2**63)
    doc = envelope("redemption.rollback.succeeded", data, event_id="ev_int64_min")
    outcome = process_delivery(pool, body_of(doc).decode(), "d_min", datetime.now(UTC).isoformat())
    assert outcome.status == "dead"
    reason = db.execute("SELECT reason FROM dead_letters").fetchone()
    assert reason is not None
    assert "22003" in reason[0]
    good = card_rollback("gift", "r_ok", "rr_ok", amount=500, balance_after=500)
    doc = envelope("redemption.rollback.succeeded", good, event_id="ev_int_ok")
    assert (
        process_delivery(pool, body_of(doc).decode(), "d_ok", datetime.now(UTC).isoformat()).status
        == "processed"
    )


def divide_by_the_events_last_digit(event: Any, conn: psycopg.Connection[Any]) -> None:
    """A handler whose statement fails (division by zero) for an event id ending in 0;
    its result is not read, so the statements queued after it go out in the pipeline."""
    conn.execute("SELECT 1 / %(v)s::integer", {"v": int(event[0][-1])})


def status_or_error(result: Result) -> str:
    """An outcome's status; for a delivery handed back, its error (the assertion shows it)."""
    return result.status if isinstance(result, Outcome) else repr(result.error)


@pytest.mark.parametrize("prepare_threshold", [0, 1, 5])
def test_batches_with_failing_deliveries_keep_prepared_statements_on_and_valid(
    database_url: str, prepare_threshold: int
) -> None:
    """A delivery failing inside a batch aborts the pipeline: PostgreSQL skips the Parse of
    any statement psycopg chose to prepare after the error, until the next sync. Reused
    later (the rest of the batch, the next batches on the connection), such a statement
    must not be run by a name the server lacks (InvalidSqlStatementName: the delivery
    handed back, or the whole batch transient); and statements are still prepared in
    batches."""
    routes = routes_to(divide_by_the_events_last_digit)
    with ConnectionPool(
        database_url, min_size=1, max_size=1, kwargs={"prepare_threshold": prepare_threshold}
    ) as one:
        for batch in range(8):
            docs = [redemption_succeeded(f"ev_{batch}_{i}{i % 2}") for i in range(6)]
            messages = [(body_of(d).decode(), uuid.uuid4().hex, now()) for d in docs]
            results = process_batch(one, messages, routes)
            assert [status_or_error(r) for r in results] == ["dead", "processed"] * 3
        good = [redemption_succeeded(f"ev_good_{i}") for i in range(1, 7)]
        messages = [(body_of(d).decode(), uuid.uuid4().hex, now()) for d in good]
        results = process_batch(one, messages, routes)
        assert [status_or_error(r) for r in results] == ["processed"] * 6
        with one.connection() as conn:
            prepared = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()
    assert prepared is not None
    assert prepared[0] > 0


def test_a_batch_without_failures_goes_in_one_pass_and_one_failure_sends_it_to_savepoints(
    pool: ConnectionPool, caplog: pytest.LogCaptureFixture
) -> None:
    """Batches are applied first without a savepoint per delivery; only when a statement
    fails is the batch rolled back and applied again, each delivery in its savepoint: the
    failing one alone is a dead letter, the others are applied once."""
    routes = routes_to(divide_by_the_events_last_digit)
    clean = [redemption_succeeded(f"ev_clean_{i}1") for i in range(5)]
    with caplog.at_level(logging.INFO, logger="workers.processing"):
        results = process_batch(
            pool, [(body_of(d).decode(), uuid.uuid4().hex, now()) for d in clean], routes
        )
    assert [status_or_error(r) for r in results] == ["processed"] * 5
    assert not [r for r in caplog.records if r.msg == "batch.isolating"]

    mixed = [redemption_succeeded(f"ev_mixed_{i}{int(i != 2)}") for i in range(5)]
    with caplog.at_level(logging.INFO, logger="workers.processing"):
        results = process_batch(
            pool, [(body_of(d).decode(), uuid.uuid4().hex, now()) for d in mixed], routes
        )
    assert [status_or_error(r) for r in results] == ["processed", "processed", "dead"] + [
        "processed"
    ] * 2
    [isolating] = [r for r in caplog.records if r.msg == "batch.isolating"]
    assert isolating.size == 5  # type: ignore[attr-defined]
    assert "DivisionByZero" in isolating.error  # type: ignore[attr-defined]
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'processed'), count(*) FROM events"
            " WHERE event_id LIKE 'ev_mixed_%%'"
        ).fetchone()
        assert row == (4, 5)
        deliveries = conn.execute(
            "SELECT count(*) FROM deliveries WHERE event_id LIKE 'ev_mixed_%%'"
        ).fetchone()
        assert deliveries == (5,)
