"""The client's writes (issue 24's foundation): a rollback, a stack's rollback, a balance
added -- against the fake over HTTP and the real PostgreSQL budget. A POST is resent only
when it cannot have been processed (429, a refused connection); else ``OutcomeUnknown``."""

from __future__ import annotations

import socket

import pytest
from psycopg_pool import ConnectionPool

from devtools.fake_voucherify import (
    DROP,
    ROLLBACK_WINDOW_KEY,
    Failure,
    FakeVoucherify,
    api_redemption,
    api_voucher,
)
from tests.jobs.conftest import Clock, client
from tests.jobs.verify_support import REDEEMED
from workers.jobs.voucherify_api import (
    BudgetExhausted,
    OutcomeUnknown,
    VoucherifyApi,
    VoucherifyApiError,
)

pytestmark = pytest.mark.usefixtures("fresh_verify_tables")

ROLLBACK = "/v1/redemptions/r_1/rollback"


def test_a_rollback_answers_the_published_shape_and_marks_the_redemption(
    api: VoucherifyApi, fake: FakeVoucherify, clock: Clock
) -> None:
    fake.add(api_redemption("gift", "r_1", 2000, date=REDEEMED))

    rollback = api.rollback_redemption("r_1", "flag 7", "track_1", clock.monotonic() + 60)

    assert (rollback["object"], rollback["result"], rollback["redemption"]) == (
        "redemption_rollback",
        "SUCCESS",
        "r_1",
    )
    assert (rollback["reason"], rollback["tracking_id"], rollback["gift"]) == (
        "flag 7",
        "track_1",
        {"amount": -2000},
    )
    assert api.get_redemption(rollback["id"], clock.monotonic() + 60) == rollback  # listed
    redemption = api.get_redemption("r_1", clock.monotonic() + 60) or {}
    assert redemption["status"] == "ROLLED_BACK"
    assert [r["id"] for r in redemption["related_redemptions"]["rollbacks"]] == [rollback["id"]]
    target, body = fake.posts[0]
    assert target == ROLLBACK + "?reason=flag+7&tracking_id=track_1"
    assert body == {}


def test_a_second_rollback_is_refused_with_voucherifys_key(
    api: VoucherifyApi, fake: FakeVoucherify, clock: Clock
) -> None:
    fake.add(api_redemption("gift", "r_1", 2000, date=REDEEMED))
    fake.add(api_redemption("gift", "r_old", 2000, date=REDEEMED))
    fake.rollback_window_closed.add("r_old")
    deadline = clock.monotonic() + 60
    api.rollback_redemption("r_1", "flag", None, deadline)

    with pytest.raises(VoucherifyApiError) as again:
        api.rollback_redemption("r_1", "flag", None, deadline)
    assert (again.value.status, again.value.key) == (400, "already_rolled_back")
    assert not isinstance(again.value, OutcomeUnknown)
    with pytest.raises(VoucherifyApiError) as late:
        api.rollback_redemption("r_old", "flag", None, deadline)
    assert (late.value.status, late.value.key) == (400, ROLLBACK_WINDOW_KEY)
    assert len(fake.posts) == 3  # none retried


def test_a_stacks_rollback_rolls_back_each_child_under_one_parent_rollback(
    api: VoucherifyApi, fake: FakeVoucherify, clock: Clock
) -> None:
    parent = api_redemption("gift", "r_parent", 3000, date=REDEEMED)
    children = [api_redemption("gift", f"r_child_{n}", 1500, date=REDEEMED) for n in (1, 2)]
    for child in children:
        child["redemption"] = "r_parent"
    fake.add(parent, *children)

    answer = api.rollback_stack("r_parent", "flag", "track_1", clock.monotonic() + 60)

    assert sorted(r["redemption"] for r in answer["rollbacks"]) == ["r_child_1", "r_child_2"]
    assert {r["result"] for r in answer["rollbacks"]} == {"SUCCESS"}
    parent_rollback = answer["parent_rollback"]
    assert (parent_rollback["redemption"], parent_rollback["result"]) == ("r_parent", "SUCCESS")
    assert {fake.redemptions[k]["status"] for k in ("r_parent", "r_child_1", "r_child_2")} == {
        "ROLLED_BACK"
    }


def test_a_balance_added_appends_a_transaction_and_answers_the_balance_object(
    api: VoucherifyApi, fake: FakeVoucherify, clock: Clock
) -> None:
    fake.vouchers["GIFT-1"] = api_voucher("gift", "v_gift_1", "GIFT-1", balance=8000)
    fake.vouchers["LOYAL-1"] = api_voucher("loyalty", "v_loyal_1", "LOYAL-1", balance=50)
    deadline = clock.monotonic() + 60

    balance = api.add_balance("GIFT-1", 2000, "flag 7", "flag-7-comp", deadline)
    points = api.add_balance("LOYAL-1", 30, "flag 8", "flag-8-comp", deadline)

    assert (balance["object"], balance["type"], balance["amount"], balance["balance"]) == (
        "balance",
        "gift_voucher",
        2000,
        10000,
    )
    assert balance["related_object"] == {"type": "voucher", "id": "v_gift_1"}
    assert (points["type"], points["balance"]) == ("loyalty_card", 80)
    [credit] = fake.transactions["GIFT-1"]
    assert (credit["type"], credit["source_id"], credit["reason"]) == (
        "CREDITS_ADDITION",
        "flag-7-comp",
        "flag 7",
    )
    assert credit["details"]["balance"]["balance"] == 10000
    assert fake.transactions["LOYAL-1"][0]["type"] == "POINTS_ADDITION"
    listed = api.list_voucher_transactions("GIFT-1", deadline)
    assert listed["data"] == [credit]
    assert fake.posts[0][1] == {"amount": 2000, "reason": "flag 7", "source_id": "flag-7-comp"}


def test_a_timeout_after_the_effect_is_an_unknown_outcome_and_is_not_resent(
    api: VoucherifyApi, fake: FakeVoucherify, clock: Clock
) -> None:
    fake.add(api_redemption("gift", "r_1", 2000, date=REDEEMED))
    fake.timeout_after_effect.add(ROLLBACK)

    with pytest.raises(OutcomeUnknown):
        api.rollback_redemption("r_1", "flag", None, clock.monotonic() + 60)

    assert len(fake.posts) == 1  # no retry sent
    assert fake.redemptions["r_1"]["status"] == "ROLLED_BACK"  # the one effect
    assert len(fake.redemptions["r_1"]["related_redemptions"]["rollbacks"]) == 1


def test_a_5xx_or_a_dropped_connection_is_an_unknown_outcome_not_retried(
    api: VoucherifyApi, fake: FakeVoucherify, clock: Clock
) -> None:
    fake.add(api_redemption("gift", "r_1", 2000, date=REDEEMED))
    fake.fail_first(ROLLBACK, Failure(503), Failure(DROP))
    deadline = clock.monotonic() + 60

    with pytest.raises(OutcomeUnknown) as server_error:
        api.rollback_redemption("r_1", "flag", None, deadline)
    assert server_error.value.status == 503
    with pytest.raises(OutcomeUnknown):
        api.rollback_redemption("r_1", "flag", None, deadline)
    assert (len(fake.posts), api.calls) == (2, 2)


def test_a_429_is_retried_honouring_retry_after(
    api: VoucherifyApi, fake: FakeVoucherify, clock: Clock
) -> None:
    fake.add(api_redemption("gift", "r_1", 2000, date=REDEEMED))
    fake.fail_first(ROLLBACK, Failure(429, {"Retry-After": "7"}))

    rollback = api.rollback_redemption("r_1", "flag", None, clock.monotonic() + 60)

    assert rollback["result"] == "SUCCESS"
    assert 7.0 in clock.sleeps
    assert len(fake.posts) == 2


def test_a_refused_connection_is_retried_nothing_having_been_sent(
    pool: ConnectionPool, clock: Clock
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    closed = client(pool, f"http://127.0.0.1:{port}", clock)
    closed.max_attempts = 2

    with pytest.raises(VoucherifyApiError) as refused:
        closed.rollback_redemption("r_1", "flag", None, clock.monotonic() + 60)

    assert not isinstance(refused.value, OutcomeUnknown)
    assert closed.calls == 2


def test_max_wait_0_with_the_minutes_slot_spent_refuses_at_once_without_a_request(
    pool: ConnectionPool, fake: FakeVoucherify, clock: Clock
) -> None:
    fake.add(api_redemption("gift", "r_1", 2000, date=REDEEMED))
    slow = client(pool, fake.url, clock, per_minute=1)  # a slot a minute
    slow.get_redemption("r_1", clock.monotonic() + 120)  # takes this minute's slot

    with pytest.raises(BudgetExhausted) as refused:
        slow.rollback_redemption("r_1", "flag", None, clock.monotonic() + 120, max_wait=0)

    assert refused.value.reason == "minute"
    assert clock.sleeps == []  # never queued
    assert fake.posts == []
