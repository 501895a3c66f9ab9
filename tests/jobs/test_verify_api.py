"""The Voucherify client: the budget per minute and per day, Voucherify's rate-limit headers,
retries of 429 / 5xx / dropped connections / TLS errors -- against the fake over HTTP."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY
from psycopg_pool import ConnectionPool

from devtools.fake_voucherify import DROP, LIST, Failure, FakeVoucherify, api_redemption
from tests.jobs.conftest import Clock, client, scalar
from tests.jobs.verify_support import REDEEMED, ledger, run
from workers.jobs.voucherify_api import (
    Budget,
    BudgetExhausted,
    VoucherifyApi,
    VoucherifyApiError,
)

pytestmark = pytest.mark.usefixtures("fresh_verify_tables")


def skipped(reason: str) -> float:
    value = REGISTRY.get_sample_value("voucherify_api_calls_skipped_total", {"reason": reason})
    return value or 0.0


def test_the_budget_counts_each_call_once_across_clients_and_refuses_past_the_day_cap(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    first, second = Budget(pool, 6000, 3), Budget(pool, 6000, 3)
    now = time.time()
    refused = [
        b.take(now + n, max_wait=1).refused for n, b in enumerate((first, second, first, second))
    ]
    assert refused == [None, None, None, "day"]
    # The refused call counted in neither period.
    assert scalar(db, "SELECT calls FROM voucherify_api_calls WHERE period = 'day'") == 3
    assert scalar(db, "SELECT calls FROM voucherify_api_calls WHERE period = 'minute'") == 3


def test_the_window_sweeps_share_of_the_day_is_kept_from_other_callers(
    pool: ConnectionPool,
) -> None:
    budget = Budget(pool, 6000, 10)
    now = time.time()
    granted = [budget.take(now + n, max_wait=1, reserve=4).refused for n in range(7)]
    assert granted == [None] * 6 + ["day"]
    assert budget.take(now + 8, max_wait=1).refused is None  # the sweep's own calls


def test_calls_of_every_process_are_spaced_by_one_shared_pace(pool: ConnectionPool) -> None:
    # 4 a minute: a slot every 15 s, whichever process asks (a sliding window, not buckets).
    one, other = Budget(pool, 4, 100), Budget(pool, 4, 100)
    now = time.time()
    waits = [b.take(now, max_wait=120).wait for b in (one, other, one, other)]
    assert [round(w, 3) for w in waits] == [0.0, 15.0, 30.0, 45.0]
    # A slot further off than the caller can wait is not taken, nor counted.
    assert one.take(now, max_wait=10).refused == "minute"
    assert one.take(now, max_wait=120).wait == pytest.approx(60.0)


def test_voucherifys_pause_holds_every_process(pool: ConnectionPool) -> None:
    one, other = Budget(pool, 6000, 100), Budget(pool, 6000, 100)
    now = time.time()
    one.pause(now + 20)
    assert other.take(now, max_wait=5).refused == "rate_limit_headers"
    assert other.take(now, max_wait=30).wait == pytest.approx(20.0)


def test_a_spent_day_budget_skips_the_call_counts_it_and_ends_the_run_quietly(
    pool: ConnectionPool, fake: FakeVoucherify, clock: Clock
) -> None:
    fake.add(api_redemption("gift", "r_1", 2000, date=REDEEMED))
    spent = client(pool, fake.url, clock, per_day=1)
    before = skipped("day")

    assert run(pool, spent).calls == 1  # the first run's one page
    result = run(pool, spent)

    assert (result.calls, result.skipped_for_budget, result.errors) == (0, 1, 0)
    assert skipped("day") == before + 1
    assert len(fake.requests) == 1  # nothing was sent


def test_a_call_waits_for_its_slot_when_the_run_has_the_time_else_it_is_skipped(
    pool: ConnectionPool, fake: FakeVoucherify, clock: Clock
) -> None:
    slow = client(pool, fake.url, clock, per_minute=1)  # a slot a minute
    slow.get_redemption("r_x", clock.monotonic() + 120)
    before = skipped("minute")

    slow.get_redemption("r_x", clock.monotonic() + 120)  # waits for the next slot
    assert clock.sleeps[-1] == pytest.approx(60.0, abs=0.5)
    # Without the time to wait, it does not even wait.
    waits = len(clock.sleeps)
    with pytest.raises(BudgetExhausted):
        slow.get_redemption("r_x", clock.monotonic() + 0.001)
    assert len(clock.sleeps) == waits
    assert skipped("minute") == before + 1
    assert fake.requested("r_x") == 2


def test_429_and_5xx_are_retried_honouring_retry_after_and_x_rate_limit_retry(
    pool: ConnectionPool,
    db: psycopg.Connection[Any],
    api: VoucherifyApi,
    fake: FakeVoucherify,
    clock: Clock,
) -> None:
    fake.add(api_redemption("gift", "r_6", 2000, date=REDEEMED))
    retry_at = clock.time() + 12
    fake.fail_first(
        LIST,
        Failure(429, {"Retry-After": "7"}),
        Failure(429, {"X-Rate-Limit-Retry": str(int(retry_at * 1000))}),  # epoch, in ms
        Failure(503),
    )

    result = run(pool, api)

    assert (result.applied, result.errors, result.calls) == (1, 0, 4)
    waits = [s for s in clock.sleeps if s > 0.05]  # not the spacing of calls
    assert waits[0] == 7.0
    assert 4.9 <= waits[1] <= 5.1  # X-Rate-Limit-Retry, 7 s later
    assert 1.0 <= waits[2] <= 2.0  # exponential backoff with jitter: 3rd attempt, 0.5 s x 2²
    assert ledger(db) == [("r_6", "debit", -2000)]


def test_few_calls_left_in_voucherifys_period_pause_ours_until_x_rate_limit_retry(
    pool: ConnectionPool, api: VoucherifyApi, fake: FakeVoucherify, clock: Clock
) -> None:
    # The shop's checkout has used most of the minute: a third of it is left to it.
    fake.rate_headers = {
        "X-Rate-Limit-Limit": "100",
        "X-Rate-Limit-Remaining": "30",
        "X-Rate-Limit-Retry": str(clock.time() + 20),
    }
    deadline = clock.monotonic() + 60
    api.get_redemption("r_a", deadline)
    api.get_redemption("r_b", deadline)
    assert any(19.9 <= s <= 20.1 for s in clock.sleeps)
    # Out of time for the pause: the call is skipped, not made.
    fake.rate_headers["X-Rate-Limit-Retry"] = str(clock.time() + 600)
    api.get_redemption("r_c", deadline)
    before = skipped("rate_limit_headers")
    with pytest.raises(BudgetExhausted):
        api.get_redemption("r_d", deadline)
    assert skipped("rate_limit_headers") == before + 1
    assert fake.requested("r_d") == 0


def test_dropped_connections_are_retried_like_a_5xx(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    fake.add(api_redemption("gift", "r_7", 2000, date=REDEEMED))
    fake.fail_first(LIST, Failure(DROP), Failure(DROP))

    result = run(pool, api)

    assert (result.applied, result.errors, result.calls) == (1, 0, 3)
    assert ledger(db) == [("r_7", "debit", -2000)]


def test_tls_errors_are_retried_and_never_abort_the_run(
    pool: ConnectionPool, db: psycopg.Connection[Any], fake: FakeVoucherify, clock: Clock
) -> None:
    # https:// to a plain-HTTP server: every attempt fails its TLS handshake (an SSLError,
    # which the official package would raise as ApiException(status=0)).
    tls = client(pool, fake.url.replace("http://", "https://"), clock)

    result = run(pool, tls)

    assert (result.errors, result.calls, result.applied) == (1, 5, 0)
    assert scalar(db, "SELECT count(*) FROM verify_watermarks") == 0  # listed next time


def test_an_api_out_of_retries_leaves_the_window_for_the_next_run(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    fake.add(api_redemption("gift", "r_8", 2000, date=REDEEMED))
    fake.fail_first(LIST, *[Failure(500)] * 5)

    assert run(pool, api).errors == 1
    assert scalar(db, "SELECT count(*) FROM redemptions") == 0
    assert run(pool, api).applied == 1


def test_an_endpoint_is_a_few_lines_on_the_one_get_path_transactions_for_the_drift_job(
    api: VoucherifyApi, fake: FakeVoucherify, clock: Clock
) -> None:
    fake.transactions["GIFT-1"] = [{"id": f"vtx_{i:03d}"} for i in range(150)]
    deadline = clock.monotonic() + 60

    first = api.list_voucher_transactions("GIFT-1", deadline)
    second = api.list_voucher_transactions("GIFT-1", deadline, first["more_starting_after"])

    assert (len(first["data"]), first["has_more"], first["data"][0]["id"]) == (100, True, "vtx_149")
    assert (len(second["data"]), second["has_more"]) == (50, False)
    with pytest.raises(VoucherifyApiError) as unknown:
        api.list_voucher_transactions("NOPE", deadline)
    assert unknown.value.status == 404
    assert api.calls == 3  # each within the budget like any other call
