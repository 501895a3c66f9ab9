"""Which deliveries may share a batch in flight: ``contention_keys`` and ``take_batch``.

Two batches in flight on two pool processes must never write the same rows, or each
waits on the other's row locks until its commit (and in turn they deadlock). Pure
functions: no servers."""

from __future__ import annotations

from typing import Any

from devtools.webhooks import body_of, card_redemption, card_rollback, envelope
from workers.batching import take_batch
from workers.delivery import contention_keys


def redemption_body(event_id: str, redemption_id: str, **ids: str) -> str:
    data = card_redemption("gift", redemption_id, amount=100, balance_after=900, **ids)
    return body_of(envelope("redemption.succeeded", data, event_id=event_id)).decode()


def test_a_redemption_names_its_event_redemption_order_and_card_but_not_customer_or_campaign() -> (
    None
):
    body = redemption_body("ev_1", "r_1", order_id="ord_1", voucher_id="v_1", customer_id="c_1")
    keys = contention_keys(body)
    assert {"event:ev_1", "r_1", "ord_1", "v_1"} <= keys
    assert "c_1" not in keys
    assert not any(key.startswith("camp_") for key in keys)


def test_a_rollback_shares_its_parent_redemption_order_and_card_with_the_redemption() -> None:
    ids = {"order_id": "ord_2", "voucher_id": "v_2"}
    redeemed = contention_keys(redemption_body("ev_r", "r_2", **ids))
    data = card_rollback("gift", "r_2", "rr_2", amount=100, balance_after=1000, **ids)
    rolled = contention_keys(
        body_of(envelope("redemption.rollback.succeeded", data, event_id="ev_rb")).decode()
    )
    assert {"r_2", "ord_2", "v_2"} <= redeemed & rolled
    assert "rr_2" in rolled


def test_duplicates_of_one_event_share_its_key_whatever_else_they_name() -> None:
    assert "event:ev_3" in contention_keys('{"event": {"id": "ev_3", "type": "x"}, "data": 1}')


def test_bodies_orjson_cannot_read_name_nothing() -> None:
    for body in ["not json", "[1, 2]", "[" * 5000, '{"event": {"id": "\ud800"}}', "null"]:
        assert contention_keys(body) == frozenset(), body


def entries(*keys: set[str]) -> list[tuple[Any, frozenset[str], float]]:
    return [(f"req{i}", frozenset(k), float(i)) for i, k in enumerate(keys)]


def test_a_batch_skips_what_a_batch_in_flight_holds_and_keeps_it_in_order() -> None:
    buffer = entries({"a"}, {"b"}, {"a", "c"}, {"d"}, {"a"})
    taken, keys = take_batch(buffer, held={"a"}, size=10)
    assert taken == ["req1", "req3"]
    assert keys == {"b", "d"}
    assert [request for request, _, _ in buffer] == ["req0", "req2", "req4"]


def test_requests_sharing_keys_go_into_one_batch_together() -> None:
    buffer = entries({"a"}, {"a", "b"}, {"b"})
    taken, keys = take_batch(buffer, held=set(), size=10)
    assert taken == ["req0", "req1", "req2"]
    assert keys == {"a", "b"}
    assert buffer == []


def test_a_batch_holds_at_most_size_requests_and_the_rest_waits() -> None:
    buffer = entries(*({str(i)} for i in range(5)))
    taken, _ = take_batch(buffer, held=set(), size=3)
    assert taken == ["req0", "req1", "req2"]
    assert [request for request, _, _ in buffer] == ["req3", "req4"]


def test_requests_without_keys_never_wait() -> None:
    buffer = entries(set(), set())
    taken, keys = take_batch(buffer, held={"a", "b"}, size=10)
    assert taken == ["req0", "req1"]
    assert keys == set()
