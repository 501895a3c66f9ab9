"""A healed movement lands on its holder: the drift job asks Voucherify for a card whose
events never named a holder (``GET /v1/vouchers/{id}``, the published voucher object),
once per card, within the budget, and moves every entry of the card to the holder."""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from devtools.fake_voucherify import (
    APP_ID,
    APP_TOKEN,
    Failure,
    FakeVoucherify,
    api_redemption,
    api_voucher,
)
from devtools.webhooks import card_redemption
from ops import store
from tests.conftest import deliver
from tests.jobs.conftest import Clock, client, rows, scalar
from tests.jobs.verify_support import REDEEMED, run
from workers.jobs.card_lookup import MAX_LOOKUP_FAILURES
from workers.jobs.drift import DriftResult, check_drift
from workers.jobs.voucherify_api import Budget, VoucherifyApi

pytestmark = pytest.mark.usefixtures("fresh_verify_tables")

HOLDER = "cust_gift_holder"


def drift(pool: ConnectionPool, api: VoucherifyApi) -> DriftResult:
    return check_drift(pool, time.monotonic() + 60, quiet_seconds=0, api=api)


def voucher_calls(fake: FakeVoucherify) -> list[str]:
    """The paths of ``GET /v1/vouchers/<code or id>`` requests (not their sub-paths)."""
    with fake.lock:
        paths = [urlsplit(target).path for target, _ in fake.requests]
    return [p for p in paths if p.startswith("/v1/vouchers/") and p.count("/") == 3]


def holderless_card(pool: ConnectionPool, n: int, balance_after: int | None = 8000) -> str:
    """A gift card redeemed by a webhook whose voucher names no holder; its id (its code
    is ``CODE-<id>``)."""
    data = card_redemption(
        "gift", f"r_noholder_{n}", 2000, 0, voucher_id=f"v_noholder_{n}", holder_id=None
    )
    for voucher in (data["voucher"], data["redemption"]["voucher"]):
        voucher["gift"]["balance"] = balance_after
    assert deliver(pool, "redemption.succeeded", data) == "processed"
    return str(data["voucher"]["id"])


def test_healed_debits_of_lost_webhooks_land_in_their_holders_ledger_at_one_call_a_card(
    pool: ConnectionPool,
    db: psycopg.Connection[Any],
    api: VoucherifyApi,
    fake: FakeVoucherify,
) -> None:
    # Five redemptions of one customer's five gift cards, every webhook lost. The listing
    # (the published shape) names the redeemer, and its voucher no holder.
    amounts = [1000, 2000, 3000, 4000, 5000]
    for n, amount in enumerate(amounts):
        fake.add(
            api_redemption(
                "gift",
                f"r_lost_{n}",
                amount,
                customer_id=HOLDER,
                date=REDEEMED,
                voucher_id=f"v_lost_{n}",
                voucher_code=f"GIFT-LOST-{n}",
            )
        )
        fake.vouchers[f"GIFT-LOST-{n}"] = api_voucher(
            "gift", f"v_lost_{n}", f"GIFT-LOST-{n}", HOLDER, 10_000 - amount
        )
    assert all("holder_id" not in r["voucher"] for r in fake.redemptions.values())

    assert run(pool, api).applied == 5
    # Healed, but on nobody's books: the measured problem.
    assert scalar(db, "SELECT count(*) FROM ledger_entries WHERE customer_id IS NULL") == 5
    assert store.ledger(db, HOLDER)["entries"] == []

    result = drift(pool, api)

    assert (result.looked_up, result.holders_learned) == (5, 5)
    assert sorted(voucher_calls(fake)) == [f"/v1/vouchers/v_lost_{n}" for n in range(5)]
    books = store.ledger(db, HOLDER)
    assert sorted((e["redemption_id"], e["effect"], e["amount"]) for e in books["entries"]) == [
        (f"r_lost_{n}", "debit", -amount) for n, amount in enumerate(amounts)
    ]
    assert books["totals"]["gift_credit"] == -sum(amounts)
    # The card's holder, and the balance Voucherify reports now (no event reported one).
    assert rows(
        db,
        "SELECT voucher_id, customer_id, reported_balance, looked_up_at IS NOT NULL"
        " FROM card_balances ORDER BY voucher_id",
    ) == [(f"v_lost_{n}", HOLDER, 10_000 - amount, True) for n, amount in enumerate(amounts)]

    again = drift(pool, api)

    assert (again.looked_up, again.holders_learned) == (0, 0)
    assert len(voucher_calls(fake)) == 5  # no further call


def test_a_card_nobody_holds_or_voucherify_does_not_know_is_asked_once_ever(
    pool: ConnectionPool,
    db: psycopg.Connection[Any],
    api: VoucherifyApi,
    fake: FakeVoucherify,
) -> None:
    nobodys = holderless_card(pool, 1, balance_after=None)
    unknown = holderless_card(pool, 2, balance_after=8000)
    fake.vouchers[nobodys] = api_voucher("gift", nobodys, f"CODE-{nobodys}", None, 6500)
    assert rows(db, "SELECT count(*) FROM card_balances WHERE customer_id IS NULL") == [(2,)]

    first = drift(pool, api)
    second = drift(pool, api)

    assert (first.looked_up, first.holders_learned) == (2, 0)
    assert (second.looked_up, second.holders_learned) == (0, 0)
    assert sorted(voucher_calls(fake)) == [f"/v1/vouchers/{nobodys}", f"/v1/vouchers/{unknown}"]
    # The balance is taken where no event reported one, never over an event's report.
    assert rows(
        db,
        "SELECT voucher_id, customer_id, reported_balance, looked_up_at IS NOT NULL"
        " FROM card_balances ORDER BY voucher_id",
    ) == [(nobodys, None, 6500, True), (unknown, None, 8000, True)]


def test_a_loyalty_cards_balance_is_its_balance_not_the_points_of_its_life(
    pool: ConnectionPool,
    db: psycopg.Connection[Any],
    api: VoucherifyApi,
    fake: FakeVoucherify,
) -> None:
    data = card_redemption("loyalty", "r_points", 20, 0, voucher_id="v_points", holder_id=None)
    for card in (data["voucher"], data["redemption"]["voucher"]):
        card["loyalty_card"]["balance"] = None
    assert deliver(pool, "redemption.succeeded", data) == "processed"
    code = data["voucher"]["code"]
    voucher = api_voucher("loyalty", "v_points", code, HOLDER, 80)
    assert voucher["loyalty_card"]["points"] != 80  # the published example's 110
    fake.vouchers["v_points"] = voucher

    assert drift(pool, api).holders_learned == 1

    assert rows(db, "SELECT customer_id, reported_balance FROM card_balances") == [(HOLDER, 80)]
    assert rows(db, "SELECT customer_id, amount FROM ledger_entries") == [(HOLDER, -20)]


def test_a_refused_budget_leaves_the_cards_not_asked_for_the_next_run(
    pool: ConnectionPool,
    db: psycopg.Connection[Any],
    fake: FakeVoucherify,
    clock: Clock,
) -> None:
    cards = [holderless_card(pool, n) for n in range(5)]
    for card in cards:
        fake.vouchers[card] = api_voucher("gift", card, f"CODE-{card}", HOLDER)
    limited = client(pool, fake.url, clock, per_day=10)

    # The drift job's share of the day is 6 of 10 (the sweep keeps 4, as the runner
    # leaves it); the lookups spend at most half of it, the rest is the heals' and checks'.
    with limited.leaving(4):
        first = drift(pool, limited)

    assert (first.looked_up, first.holders_learned, limited.skipped) == (3, 3, 1)
    assert scalar(db, "SELECT count(*) FROM card_balances WHERE looked_up_at IS NULL") == 2
    assert scalar(db, "SELECT count(*) FROM card_balances WHERE lookup_failures > 0") == 0

    db.execute("DELETE FROM voucherify_api_calls")  # a new day
    with limited.leaving(4):
        second = drift(pool, limited)

    assert (second.looked_up, second.holders_learned) == (2, 2)
    assert sorted(voucher_calls(fake)) == [f"/v1/vouchers/{card}" for card in cards]
    assert scalar(db, "SELECT count(*) FROM ledger_entries WHERE customer_id = %s", HOLDER) == 5


def test_a_failing_call_is_retried_on_later_runs_but_not_forever(
    pool: ConnectionPool,
    db: psycopg.Connection[Any],
    fake: FakeVoucherify,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken, flaky = holderless_card(pool, 1), holderless_card(pool, 2)
    fake.vouchers[broken] = api_voucher("gift", broken, f"CODE-{broken}", HOLDER)
    fake.vouchers[flaky] = api_voucher("gift", flaky, f"CODE-{flaky}", HOLDER)
    fake.fail_first(broken, *[Failure(500)] * 20)
    fake.fail_first(flaky, Failure(500), Failure(500))
    once = VoucherifyApi(  # one attempt a call: each run's call fails or answers
        fake.url,
        APP_ID,
        APP_TOKEN,
        Budget(pool, 6000, 100_000),
        max_attempts=1,
        sleep=clock.sleep,
        clock=clock.monotonic,
        wall_clock=clock.time,
    )

    with caplog.at_level(logging.WARNING, logger="workers.jobs.card_lookup"):
        learned = [drift(pool, once).holders_learned for _ in range(MAX_LOOKUP_FAILURES + 2)]

    assert learned == [0, 0, 1, 0, 0, 0, 0]  # the flaky card on its third run
    calls = voucher_calls(fake)
    assert calls.count(f"/v1/vouchers/{flaky}") == 3
    assert calls.count(f"/v1/vouchers/{broken}") == MAX_LOOKUP_FAILURES  # then left alone
    assert rows(
        db,
        "SELECT voucher_id, customer_id, lookup_failures, looked_up_at IS NULL"
        " FROM card_balances ORDER BY voucher_id",
    ) == [(broken, None, MAX_LOOKUP_FAILURES, True), (flaky, HOLDER, 2, False)]
    failed = [r for r in caplog.records if r.getMessage() == "drift.lookup_failed"]
    assert len(failed) == MAX_LOOKUP_FAILURES + 2
    # The card's code is not in the logs: asked by its id, its code masked.
    assert all(f"CODE-{broken}" not in str(r.__dict__) for r in failed)
    assert {getattr(r, "voucher_code", None) for r in failed} == {"\u2026er_1", "\u2026er_2"}


def test_wrong_credentials_end_the_lookups_without_counting_against_the_cards(
    pool: ConnectionPool, db: psycopg.Connection[Any], fake: FakeVoucherify, clock: Clock
) -> None:
    for n in range(3):
        holderless_card(pool, n)
    wrong = client(pool, fake.url, clock, token="wrong-token")

    result = drift(pool, wrong)

    assert (result.looked_up, result.holders_learned) == (0, 0)
    assert len(voucher_calls(fake)) == 1  # no other card of the run can do better
    assert rows(db, "SELECT count(*) FROM card_balances WHERE lookup_failures > 0") == [(0,)]
    assert rows(db, "SELECT count(*) FROM card_balances WHERE looked_up_at IS NULL") == [(3,)]


def test_a_card_whose_events_named_its_holder_is_never_looked_up(
    pool: ConnectionPool,
    db: psycopg.Connection[Any],
    api: VoucherifyApi,
    fake: FakeVoucherify,
) -> None:
    data = card_redemption("gift", "r_held", 2000, 8000, customer_id=HOLDER)
    assert deliver(pool, "redemption.succeeded", data) == "processed"

    results = [drift(pool, api) for _ in range(2)]

    assert [(r.looked_up, r.holders_learned) for r in results] == [(0, 0), (0, 0)]
    assert voucher_calls(fake) == []
    assert rows(db, "SELECT customer_id, looked_up_at FROM card_balances") == [(HOLDER, None)]


def test_get_voucher_is_one_call_on_the_one_get_path_and_none_when_unknown(
    api: VoucherifyApi, fake: FakeVoucherify, clock: Clock
) -> None:
    fake.vouchers["GIFT 1/A"] = api_voucher("gift", "v_gift_1", "GIFT 1/A", HOLDER, 4200)
    deadline = clock.monotonic() + 60

    by_code = api.get_voucher("GIFT 1/A", deadline)
    by_id = api.get_voucher("v_gift_1", deadline)

    assert by_code is not None
    assert (by_code["holder_id"], by_code["gift"]["balance"], by_code["object"]) == (
        HOLDER,
        4200,
        "voucher",
    )
    assert by_id == by_code
    assert api.get_voucher("NOPE", deadline) is None
    assert api.calls == 3
    assert voucher_calls(fake)[0] == "/v1/vouchers/GIFT%201%2FA"
