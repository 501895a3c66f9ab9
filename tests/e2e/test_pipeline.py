"""The whole flow with real processes: gunicorn receiver -> Redis -> celery worker -> PostgreSQL."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
import redis

from devtools.webhooks import (
    body_of,
    card_redemption,
    card_rollback,
    card_rollback_failed,
    envelope,
    sign,
    wait_until,
)
from tests.conftest import Processes, http_call
from workers.queue import ACCEPTED_HASH

pytestmark = pytest.mark.e2e


def post(port: int, body: bytes, signature: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["x-voucherify-signature"] = signature
    response, raw = http_call(port, "POST", "/webhooks/voucherify", body, headers)
    return response.status, json.loads(raw or b"{}")


def test_signed_webhooks_end_as_rows_in_postgresql(
    pipeline_port: int,
    processes: Processes,
    db: psycopg.Connection[Any],
    redis_client: redis.Redis,
) -> None:
    redeemed = envelope(
        "redemption.succeeded",
        card_redemption("gift", "r_e2e", amount=2000, balance_after=8000),
        event_id="evred_e2e_1",
    )
    rolled = envelope(
        "redemption.rollback.succeeded",
        card_rollback("gift", "r_e2e", "rr_e2e", amount=2000, balance_after=10000),
        event_id="evred_e2e_2",
    )
    failed = envelope(
        "redemption.rollback.failed",
        card_rollback_failed("r_e2e", "rrf_e2e"),
        event_id="evred_e2e_3",
    )
    invalid_data = card_redemption("gift", "r_bad", amount=1, balance_after=1)
    invalid_data["redemption"]["date"] = "yesterday"
    invalid = envelope("redemption.succeeded", invalid_data, event_id="evred_e2e_bad")
    unknown = envelope("voucher.published", {"voucher": {"id": "v_1"}}, event_id="evvou_e2e")

    accepted = []
    for doc in (rolled, redeemed, redeemed, failed, invalid, unknown):  # out of order, a duplicate
        body = body_of(doc)
        status, payload = post(pipeline_port, body, sign(body))
        assert status == 202, payload
        assert payload["status"] == "accepted"
        accepted.append(payload["delivery_id"])
    # The repeat of an accepted event id is answered with its first delivery, not queued.
    assert accepted[1] == accepted[2]
    status, payload = post(pipeline_port, body_of(unknown), sign(body_of(unknown), "wrong-secret"))
    assert status == 401
    assert payload == {"error": "invalid_signature"}

    def all_recorded() -> bool:
        row = db.execute("SELECT count(*) FROM deliveries").fetchone()
        return row is not None and row[0] == len(set(accepted))

    wait_until(
        all_recorded,
        timeout=60,
        what=lambda: "every accepted delivery recorded\n" + processes.logs(),
    )

    # Each worker forgot its delivery's accepted copy once the inbox had it.
    wait_until(
        lambda: redis_client.hlen(ACCEPTED_HASH) == 0, timeout=10, what="accepted copies forgotten"
    )

    statuses = dict(db.execute("SELECT event_id, status FROM events").fetchall())
    assert statuses == {
        "evred_e2e_1": "processed",
        "evred_e2e_2": "processed",
        "evred_e2e_3": "processed",
        "evred_e2e_bad": "dead",
        "evvou_e2e": "ignored",
    }
    delivered = {r[0] for r in db.execute("SELECT delivery_id FROM deliveries").fetchall()}
    assert delivered == set(accepted)
    assert db.execute("SELECT status, rollback_id FROM redemptions").fetchall() == [
        ("ROLLED_BACK", "rr_e2e")
    ]
    assert db.execute("SELECT status FROM orders").fetchall() == [("CANCELED",)]
    assert db.execute(
        "SELECT effect, kind, amount FROM ledger_entries ORDER BY effect"
    ).fetchall() == [("debit", "gift_credit", -2000), ("restore", "gift_credit", 2000)]
    assert db.execute("SELECT category, rollback_id FROM flags").fetchall() == [
        ("already_rolled_back", "rrf_e2e")
    ]
    reason = db.execute("SELECT reason FROM dead_letters").fetchone()
    assert reason is not None
    assert "date" in reason[0]


def test_a_thousand_replays_of_one_signed_body_are_one_delivery_and_one_effect(
    pipeline_port: int, db: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    body = body_of(
        envelope(
            "redemption.succeeded",
            card_redemption("gift", "r_replayed", amount=700, balance_after=300),
            event_id="evred_replayed",
        )
    )
    signature = sign(body)
    answers = [post(pipeline_port, body, signature) for _ in range(1_000)]
    assert {status for status, _ in answers} == {202}
    [payload] = {answer["delivery_id"] for _, answer in answers}  # one delivery id, each time

    wait_until(
        lambda: db.execute("SELECT count(*) FROM deliveries").fetchone() == (1,),
        timeout=30,
        what="the one delivery recorded",
    )
    assert db.execute("SELECT delivery_id, outcome FROM deliveries").fetchall() == [
        (payload, "processed")
    ]
    assert db.execute("SELECT count(*), sum(amount) FROM ledger_entries").fetchone() == (1, -700)
    assert redis_client.llen("deliveries") == 0
