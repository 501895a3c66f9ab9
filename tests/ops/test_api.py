"""The ops API as docs/contract.md ("Ops API") describes it, on real PostgreSQL and Redis."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import psycopg
import pytest
import redis
from flask.testing import FlaskClient
from psycopg_pool import ConnectionPool

from config.settings import Settings
from devtools.servers import free_port
from devtools.webhooks import (
    CARD_IDS,
    card_redemption,
    card_transaction,
    card_transaction_event,
    envelope,
)
from tests.ops.conftest import AUTH, TOKEN, State
from tests.ops.conftest import deliver as ops_deliver
from tests.workers.test_stacks import STACK
from tests.workers.test_stacks import apply as apply_steps
from web.app import create_app
from workers.queue import DELIVERY_QUEUE


def get(client: FlaskClient, path: str, **query: Any) -> tuple[int, Any]:
    response = client.get(path, headers=AUTH, query_string=query)
    assert response.mimetype == "application/json", path
    return response.status_code, response.get_json()


def post(client: FlaskClient, path: str, document: Any = None) -> tuple[int, Any]:
    response = client.post(path, headers=AUTH, json=document)
    assert response.mimetype == "application/json", path
    return response.status_code, response.get_json()


def queued_bodies(redis_client: redis.Redis) -> list[dict[str, Any]]:
    """The task kwargs of every message waiting in the deliveries list."""
    kwargs = []
    for raw in redis_client.lrange(DELIVERY_QUEUE, 0, -1):
        message = json.loads(raw)
        _, task_kwargs, _ = json.loads(base64.b64decode(message["body"]))
        kwargs.append(task_kwargs)
    return kwargs


def test_without_a_token_the_whole_ops_tree_answers_404(settings: Settings) -> None:
    assert settings.ops_api_token is None
    client = create_app(settings).test_client()
    for path in ("/ops/api/events/ev_1", "/ops/api/flags", "/ops/", "/ops/login"):
        assert client.get(path, headers=AUTH).status_code == 404, path
    assert client.post("/ops/api/dead-letters/1/replay", headers=AUTH).status_code == 404


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer", "Bearer wrong-token", f"Basic {TOKEN}", f"Bearer {TOKEN}x", TOKEN],
)
def test_requests_without_the_right_bearer_token_get_401(
    client: FlaskClient, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    for method, path in (("GET", "/ops/api/flags"), ("POST", "/ops/api/flags/1/resolve")):
        response = client.open(path, method=method, headers=headers)
        assert response.status_code == 401
        assert response.get_json() == {"error": "unauthorized"}
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_an_event_shows_its_status_attempts_and_every_delivery(
    client: FlaskClient, state: State
) -> None:
    status, event = get(client, f"/ops/api/events/{state.redeemed_event}")
    assert status == 200
    assert event["event_id"] == state.redeemed_event
    assert event["type"] == "redemption.succeeded"
    assert event["status"] == "processed"
    assert event["attempts"] == 1
    assert event["last_error"] is None
    assert event["delivery_ids"] == ["d_ops_1", "d_ops_2"]
    assert [(d["delivery_id"], d["outcome"]) for d in event["deliveries"]] == [
        ("d_ops_1", "processed"),
        ("d_ops_2", "duplicate"),
    ]
    assert event["redemption_id"] == state.redeemed

    _, dead = get(client, f"/ops/api/events/{state.dead_event}")
    assert dead["status"] == "dead"
    assert dead["last_error"].startswith("validation failed")
    assert [d["reason"] for d in dead["dead_letters"]] == [dead["last_error"]]


def test_unknown_ids_answer_404_not_found(client: FlaskClient, state: State) -> None:
    for path in (
        "/ops/api/events/ev_nope",
        "/ops/api/orders/ord_nope",
        "/ops/api/redemptions/r_nope",
        "/ops/api/customers/cust_nope/ledger",
        "/ops/api/flags/999999",
        "/ops/api/dead-letters/999999",
        "/ops/api/no-such-thing",
        "/ops/api/flags/not-a-number/resolve",
    ):
        assert get(client, path) == (404, {"error": "not_found"}), path
    assert post(client, "/ops/api/flags/999999/resolve", {"note": "x"}) == (
        404,
        {"error": "not_found"},
    )
    assert post(client, "/ops/api/flags/99999999999999999999/resolve", {}) == (
        404,
        {"error": "not_found"},
    )
    assert post(client, "/ops/api/dead-letters/999999/replay") == (404, {"error": "not_found"})
    assert post(client, "/ops/api/events/ev_nope/replay") == (404, {"error": "not_found"})


def test_errors_are_json(client: FlaskClient, state: State) -> None:
    status, body = get(client, "/ops/api/flags/1/resolve")
    assert status == 405
    assert body == {"error": "method_not_allowed"}
    response = client.post(
        "/ops/api/flags/1/resolve", headers=AUTH, data="{not json", content_type="application/json"
    )
    assert response.status_code == 400
    assert response.get_json()["error"] == "invalid_parameter"
    assert post(client, "/ops/api/flags/1/resolve", {"note": 12})[0] == 400
    for query in ({"limit": "0"}, {"limit": "501"}, {"limit": "x"}, {"cursor": "abc"}):
        status, body = get(client, "/ops/api/flags", **query)
        assert status == 400
        assert body["error"] == "invalid_parameter"
    assert get(client, "/ops/api/events", cursor="!!")[0] == 400
    assert get(client, "/ops/api/events", since="last tuesday")[0] == 400
    assert get(client, "/ops/api/flags", status="closed")[0] == 400


def test_order_redemption_and_customer_ledger_carry_the_contract_fields(
    client: FlaskClient, state: State
) -> None:
    status, order = get(client, f"/ops/api/orders/{state.order_id}")
    assert status == 200
    assert {k: order[k] for k in ("order_id", "status", "customer_id")} == {
        "order_id": state.order_id,
        "status": "CANCELED",
        "customer_id": state.customer_id,
    }
    assert isinstance(order["amount"], int)
    assert isinstance(order["total_amount"], int)
    assert [r["redemption_id"] for r in order["redemptions"]] == [state.redeemed]

    status, redemption = get(client, f"/ops/api/redemptions/{state.redeemed}")
    assert status == 200
    assert {
        k: redemption[k]
        for k in ("redemption_id", "status", "order_id", "customer_id", "amount", "rollback_id")
    } == {
        "redemption_id": state.redeemed,
        "status": "ROLLED_BACK",
        "order_id": state.order_id,
        "customer_id": state.customer_id,
        "amount": 2000,
        "rollback_id": state.rollback_id,
    }
    assert redemption["voucher_code"]
    # What happened to it: both events, the debit and the restore.
    assert [(e["type"], e["status"]) for e in redemption["events"]] == [
        ("redemption.succeeded", "processed"),
        ("redemption.rollback.succeeded", "processed"),
    ]
    assert sorted((e["effect"], e["amount"]) for e in redemption["ledger_entries"]) == [
        ("debit", -2000),
        ("restore", 2000),
    ]

    status, ledger = get(client, f"/ops/api/customers/{state.customer_id}/ledger")
    assert status == 200
    assert ledger["customer_id"] == state.customer_id
    assert ledger["totals"] == {"gift_credit": 0, "loyalty_points": -300}
    entries = [(e["kind"], e["amount"], e["redemption_id"]) for e in ledger["entries"]]
    assert entries == [
        ("gift_credit", -2000, state.redeemed),
        ("gift_credit", 2000, state.redeemed),
        ("loyalty_points", -300, state.loyalty),
    ]
    assert all(e["reason"] for e in ledger["entries"])
    page_1 = get(client, f"/ops/api/customers/{state.customer_id}/ledger", limit=2)[1]
    assert len(page_1["entries"]) == 2
    page_2 = get(
        client,
        f"/ops/api/customers/{state.customer_id}/ledger",
        limit=2,
        cursor=page_1["next_cursor"],
    )[1]
    assert [e["amount"] for e in page_2["entries"]] == [-300]
    assert page_2["next_cursor"] is None
    assert page_2["totals"] == ledger["totals"]


def test_a_redemption_known_only_from_flags_is_shown_not_404(
    client: FlaskClient, state: State
) -> None:
    status, redemption = get(client, f"/ops/api/redemptions/{state.flagged}")
    assert status == 200
    assert redemption["status"] is None
    assert [f["failure_code"] for f in redemption["flags"]] == [
        "voucher_disabled",
        "already_rolled_back",
    ]


def test_flags_filter_paginate_and_resolve_once(
    client: FlaskClient, state: State, db: psycopg.Connection[Any]
) -> None:
    status, flags = get(client, "/ops/api/flags", status="open")
    assert status == 200
    assert len(flags["items"]) == 3
    assert flags["next_cursor"] is None
    for item in flags["items"]:
        assert set(item) >= {
            "id",
            "redemption_id",
            "rollback_id",
            "failure_code",
            "failure_message",
            "status",
            "created_at",
        }
    ids = [f["id"] for f in flags["items"]]
    assert ids == sorted(ids, reverse=True)  # newest first

    by_code = get(client, "/ops/api/flags", failure_code="voucher_disabled")[1]["items"]
    assert {f["rollback_id"] for f in by_code} == {"rrf_ops_1", "rrf_ops_2"}
    # The payload shows the redemption ROLLED_BACK, which we have no record of: a lost rollback.
    assert get(client, "/ops/api/flags", category="lost_rollback")[1]["items"][0][
        "failure_code"
    ] == ("already_rolled_back")

    first = get(client, "/ops/api/flags", limit=2)[1]
    assert [f["id"] for f in first["items"]] == ids[:2]
    assert first["next_cursor"] == ids[1]
    second = get(client, "/ops/api/flags", limit=2, cursor=first["next_cursor"])[1]
    assert [f["id"] for f in second["items"]] == ids[2:]
    assert second["next_cursor"] is None

    status, resolved = post(client, f"/ops/api/flags/{ids[0]}/resolve", {"note": "refunded"})
    assert status == 200
    assert resolved["id"] == ids[0]
    assert resolved["status"] == "resolved"
    assert resolved["note"] == "refunded"
    assert resolved["resolved_at"]
    again = post(client, f"/ops/api/flags/{ids[0]}/resolve", {"note": "second try"})
    assert again == (200, resolved)  # unchanged, harmless
    assert [f["id"] for f in get(client, "/ops/api/flags", status="open")[1]["items"]] == ids[1:]
    assert [f["id"] for f in get(client, "/ops/api/flags", status="resolved")[1]["items"]] == [
        ids[0]
    ]
    row = db.execute("SELECT status, note FROM flags WHERE id = %s", (ids[0],)).fetchone()
    assert row == ("resolved", "refunded")
    # No body at all is a resolve without a note.
    assert client.post(f"/ops/api/flags/{ids[1]}/resolve", headers=AUTH).status_code == 200


def test_dead_letter_replay_requeues_the_event_to_be_processed_again(
    client: FlaskClient,
    state: State,
    db: psycopg.Connection[Any],
    redis_client: redis.Redis,
    pool: Any,
) -> None:
    status, letters = get(client, "/ops/api/dead-letters", type="redemption.succeeded")
    assert status == 200
    (letter,) = letters["items"]
    assert set(letter) >= {"id", "event_id", "type", "reason", "created_at"}
    assert letter["event_id"] == state.dead_event
    assert get(client, "/ops/api/dead-letters", type="voucher.published")[1]["items"] == []

    status, body = post(client, f"/ops/api/dead-letters/{letter['id']}/replay")
    assert (status, body["status"], body["event_id"]) == (200, "requeued", state.dead_event)
    replayed_at, event_status = db.execute(
        "SELECT d.replayed_at, e.status FROM dead_letters d JOIN events e USING (event_id)"
    ).fetchone()
    assert replayed_at is not None
    assert event_status == "received"
    (queued,) = queued_bodies(redis_client)
    assert queued["delivery_id"] == body["delivery_id"]
    assert queued["delivery_id"].startswith("replay-")
    assert json.loads(queued["body"])["event"]["id"] == state.dead_event
    assert get(client, "/ops/api/dead-letters", replayed="false")[1]["items"] == []

    # What the worker does with the message: it applies the event again (here the payload
    # is still invalid, so it dies again) instead of recording a duplicate.
    from workers.processing import process_delivery

    outcome = process_delivery(pool, queued["body"], queued["delivery_id"], queued["received_at"])
    assert outcome.status == "dead"
    assert db.execute("SELECT count(*) FROM dead_letters").fetchone() == (2,)


def test_replay_answers_requeued(client: FlaskClient, state: State) -> None:
    letter = get(client, "/ops/api/dead-letters")[1]["items"][0]
    status, body = post(client, f"/ops/api/dead-letters/{letter['id']}/replay")
    assert status == 200
    assert body["status"] == "requeued"
    assert body["event_id"] == state.dead_event
    status, body = post(client, f"/ops/api/events/{state.redeemed_event}/replay")
    assert (status, body["status"], body["status_before"]) == (200, "requeued", "processed")


def test_a_dead_letter_whose_payload_was_pruned_answers_409(
    client: FlaskClient, state: State, db: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    db.execute("UPDATE events SET payload = NULL WHERE event_id = %s", (state.dead_event,))
    letter = get(client, "/ops/api/dead-letters")[1]["items"][0]
    status, body = post(client, f"/ops/api/dead-letters/{letter['id']}/replay")
    assert status == 409
    assert body["error"] == "payload_pruned"
    assert redis_client.llen(DELIVERY_QUEUE) == 0
    row = db.execute("SELECT replayed_at FROM dead_letters").fetchone()
    assert row == (None,)


def test_a_replay_redis_refuses_changes_nothing(
    ops_settings: Settings, state: State, db: psycopg.Connection[Any]
) -> None:
    broken = dataclasses.replace(ops_settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    client = create_app(broken).test_client()
    letter_id = db.execute("SELECT id FROM dead_letters").fetchone()[0]
    response = client.post(f"/ops/api/dead-letters/{letter_id}/replay", headers=AUTH)
    assert response.status_code == 503
    assert response.get_json() == {"error": "broker_unavailable"}
    assert response.headers["Retry-After"]
    row = db.execute(
        "SELECT d.replayed_at, e.status FROM dead_letters d JOIN events e USING (event_id)"
    ).fetchone()
    assert row == (None, "dead")


def test_events_list_filters_by_status_type_and_time_with_a_cursor(
    client: FlaskClient, state: State
) -> None:
    everything = get(client, "/ops/api/events", limit=500)[1]["items"]
    assert len(everything) == 8
    failed = get(client, "/ops/api/events", status="failed,dead", since="today")[1]
    assert [e["event_id"] for e in failed["items"]] == [state.dead_event]
    ignored = get(client, "/ops/api/events", status="ignored")[1]["items"]
    assert [e["type"] for e in ignored] == ["voucher.published"]
    assert get(client, "/ops/api/events", since="2099-01-01")[1]["items"] == []
    assert len(get(client, "/ops/api/events", until="2099-01-01", limit=500)[1]["items"]) == 8
    typed = get(client, "/ops/api/events", type="redemption.rollback.failed")[1]["items"]
    assert len(typed) == 3

    seen: list[str] = []
    cursor = None
    while True:
        query = {"limit": 4, **({"cursor": cursor} if cursor else {})}
        page = get(client, "/ops/api/events", **query)[1]
        seen += [e["event_id"] for e in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [e["event_id"] for e in everything]


def test_search_finds_each_kind_of_id(client: FlaskClient, state: State) -> None:
    def hits(q: str) -> dict[str, list[str]]:
        found = get(client, "/ops/api/search", q=q)[1]
        return {
            kind: [next(iter(row.values())) for row in found[kind]]
            for kind in ("events", "redemptions", "orders", "customers")
            if found[kind]
        }

    assert hits(state.redeemed_event) == {"events": [state.redeemed_event]}
    assert hits("d_ops_2") == {"events": [state.redeemed_event]}
    assert hits(state.redeemed) == {"redemptions": [state.redeemed]}
    assert hits(state.rollback_id) == {"redemptions": [state.redeemed]}
    assert hits(state.order_id) == {"orders": [state.order_id]}
    assert hits(state.customer_id) == {"customers": [state.customer_id]}
    assert hits("nothing-like-this") == {}
    assert get(client, "/ops/api/search")[0] == 400


def test_stats_sum_up_the_pipeline(
    client: FlaskClient, state: State, redis_client: redis.Redis
) -> None:
    redis_client.lpush(DELIVERY_QUEUE, b"{}", b"{}")
    status, stats = get(client, "/ops/api/stats")
    assert status == 200
    assert stats["events_by_status"] == {
        "received": 0,
        "processed": 6,
        "ignored": 1,
        "failed": 0,
        "dead": 1,
    }
    assert stats["deliveries_last_hour"]["duplicate"] == 1
    assert stats["open_flags"] == {
        "already_rolled_back": 0,
        "review": 2,
        "drift": 0,
        "lost_rollback": 1,
    }
    assert stats["dead_letters_pending"] == 1
    assert stats["queue_depth"] == {
        "deliveries": 2,
        "deliveries.parked": 0,
        "jobs": 0,
        "deliveries.accepted": 0,
    }
    assert stats["waiting_events"] == 0
    assert stats["oldest_waiting_event_age_seconds"] is None
    assert stats["lag_last_hour_seconds"]["count"] == 7


def test_metrics_carry_the_pipeline_gauges_and_the_ops_requests(
    client: FlaskClient, state: State, redis_client: redis.Redis, db: psycopg.Connection[Any]
) -> None:
    redis_client.lpush(DELIVERY_QUEUE, b"{}")
    db.execute(
        "UPDATE events SET status = 'failed', received_at = now() - interval '90 seconds' "
        "WHERE event_id = %s",
        (state.redeemed_event,),
    )
    get(client, f"/ops/api/events/{state.redeemed_event}")
    text = client.get("/metrics").get_data(as_text=True)
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['pipeline_open_flags{category="review"}'] == 2
    assert samples['pipeline_open_flags{category="lost_rollback"}'] == 1
    assert samples['pipeline_open_flags{category="drift"}'] == 0
    assert samples["pipeline_dead_letters_pending"] == 1
    assert samples['pipeline_queue_depth{queue="deliveries"}'] == 1
    assert samples['pipeline_queue_depth{queue="deliveries.accepted"}'] == 0
    assert samples["pipeline_waiting_events"] == 1
    assert samples["pipeline_oldest_waiting_event_age_seconds"] >= 90
    assert samples['pipeline_state_up{source="postgres"}'] == 1
    assert samples['pipeline_state_up{source="redis"}'] == 1
    key = 'receiver_requests_total{code="200",path="/ops/api/events/<event_id>"}'
    assert samples[key] >= 1


def test_metrics_answer_when_the_database_and_redis_are_gone(ops_settings: Settings) -> None:
    gone = dataclasses.replace(
        ops_settings,
        database_url=f"postgresql://nobody@127.0.0.1:{free_port()}/none",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
    )
    response = create_app(gone).test_client().get("/metrics")
    assert response.status_code == 200
    text = response.get_data(as_text=True)
    assert 'pipeline_state_up{source="postgres"} 0.0' in text
    assert 'pipeline_state_up{source="redis"} 0.0' in text


def test_a_customers_ledger_lists_the_movements_of_the_cards_they_hold(
    client: FlaskClient, pool: ConnectionPool
) -> None:
    # The owner's gift card: topped up, then spent by a friend at the friend's checkout.
    top_up = card_transaction(
        "gift", "vtx_top", "CREDITS_ADDITION", 5000, 5000, "2024-02-01T08:00:00Z"
    )
    event_type, data = card_transaction_event("gift", top_up, holder_id="cust_owner")
    assert ops_deliver(pool, envelope(event_type, data)) == "processed"
    spent = card_redemption(
        "gift",
        "r_friend",
        1200,
        3800,
        customer_id="cust_friend",
        holder_id="cust_owner",
        order_id="ord_friend",
        date="2024-02-01T09:00:00Z",
    )
    assert ops_deliver(pool, envelope("redemption.succeeded", spent)) == "processed"

    status, owner = get(client, "/ops/api/customers/cust_owner/ledger")
    assert status == 200
    assert owner["totals"] == {"gift_credit": 3800, "loyalty_points": 0}
    assert [
        (e["kind"], e["amount"], e["voucher_id"], e["redemption_id"], e["reason"])
        for e in owner["entries"]
    ] == [
        ("gift_credit", 5000, CARD_IDS["gift"], None, "CREDITS_ADDITION"),
        ("gift_credit", -1200, CARD_IDS["gift"], "r_friend", "redemption"),
    ]
    assert owner["entries"][1]["redeemer_id"] == "cust_friend"
    status, friend = get(client, "/ops/api/customers/cust_friend/ledger")
    assert (status, friend["entries"], friend["totals"]) == (
        200,
        [],
        {"gift_credit": 0, "loyalty_points": 0},
    )


def test_a_stacks_parent_shows_its_children_and_their_statuses(
    client: FlaskClient, pool: ConnectionPool
) -> None:
    apply_steps(pool, STACK)
    status, parent = get(client, "/ops/api/redemptions/r_stack")
    assert status == 200
    assert parent["status"] == "ROLLED_BACK"
    assert [(c["redemption_id"], c["status"], c["amount"]) for c in parent["children"]] == [
        ("r_stack_gift", "ROLLED_BACK", 1000),
        ("r_stack_loyalty", "ROLLED_BACK", 30),
    ]
    status, child = get(client, "/ops/api/redemptions/r_stack_gift")
    assert (child["parent_redemption_id"], child["children"]) == ("r_stack", [])
