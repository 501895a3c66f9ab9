"""The listing's window: split past the last page, watermark, overlap, resumed after a cut."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from devtools.fake_voucherify import FakeVoucherify, api_redemption
from tests.jobs.conftest import Clock, client, rows, scalar
from tests.jobs.verify_support import OVERLAP, SETTLE, ago, run
from workers.jobs.verify import window
from workers.jobs.verify.job import Tally, _apply, _heal
from workers.jobs.voucherify_api import BudgetExhausted, VoucherifyApi

pytestmark = pytest.mark.usefixtures("fresh_verify_tables")


def sweep(pool: ConnectionPool, api: VoucherifyApi, page_limit: int, max_page: int) -> Tally:
    """One sweep of the window, given 60 s on the client's clock."""
    tally = Tally()
    window.sweep(
        pool,
        api,
        SETTLE,
        OVERLAP,
        api.clock() + 60,
        lambda found: _heal(pool, found, tally),
        tally,
        lambda event: _apply(pool, event),
        page_limit=page_limit,
        max_page=max_page,
    )
    return tally


def test_a_window_needing_more_pages_than_voucherify_serves_is_split(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    # 2 a page, at most 2 pages deep: 9 redemptions (two sharing one instant) need 3 chunks,
    # each from 1 ms before the last instant the one before listed (re-listed items: once).
    fake.max_page = 2
    dates = [ago(hours=5, minutes=-i) for i in range(8)]
    dates.insert(4, dates[3])
    for i, date in enumerate(dates):
        fake.add(api_redemption("gift", f"r_{i}", 100 + i, date=date))

    tally = sweep(pool, api, page_limit=2, max_page=2)

    assert scalar(db, "SELECT count(*) FROM redemptions") == 9
    assert scalar(db, "SELECT count(*) FROM ledger_entries WHERE effect = 'debit'") == 9
    assert (tally["listed"], tally["applied"]) == (9, 9)
    assert tally["windows_split"] == 2
    assert max(int(q["page"]) for q in fake.list_requests()) == 2  # never past the last page
    # Each split starts 1 ms before the last instant listed, so no redemption is lost.
    afters = [q["created_at[after]"] for q in fake.list_requests() if q["page"] == "1"]
    assert afters == sorted(set(afters))


def test_the_watermark_moves_to_the_window_end_and_the_next_run_lists_from_it_less_the_overlap(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    run(pool, api)
    swept_to = scalar(db, "SELECT swept_to FROM verify_watermarks")
    assert abs((datetime.now(UTC) - timedelta(seconds=SETTLE)) - swept_to) < timedelta(seconds=5)
    [first] = fake.list_requests()
    assert first["created_at[after]"] < ago(hours=23, minutes=59)  # the first run looks back a day

    # A late write: Voucherify lists, after the sweep, a redemption dated before the
    # watermark but within the overlap; one older than the overlap is not listed again.
    late = (swept_to - timedelta(seconds=OVERLAP / 2)).isoformat(timespec="milliseconds")
    fake.add(api_redemption("gift", "r_late", 700, date=late.replace("+00:00", "Z")))
    too_old = (swept_to - timedelta(seconds=OVERLAP * 2)).isoformat(timespec="milliseconds")
    fake.add(api_redemption("gift", "r_too_old", 800, date=too_old.replace("+00:00", "Z")))

    result = run(pool, api)

    assert result.applied == 1
    assert rows(db, "SELECT redemption_id FROM redemptions") == [("r_late",)]
    second = fake.list_requests()[1]
    expected = (swept_to - timedelta(seconds=OVERLAP)).astimezone(UTC)
    assert second["created_at[after]"] == expected.isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )
    assert scalar(db, "SELECT swept_to FROM verify_watermarks") > swept_to


def test_a_run_cut_short_by_the_day_budget_goes_on_from_its_last_page_next_time(
    pool: ConnectionPool,
    db: psycopg.Connection[Any],
    fake: FakeVoucherify,
    clock: Clock,
) -> None:
    for i in range(5):
        fake.add(api_redemption("gift", f"r_{i}", 100 + i, date=ago(hours=5, minutes=-i)))
    tight = client(pool, fake.url, clock, per_day=2)

    with pytest.raises(BudgetExhausted):
        sweep(pool, tight, page_limit=2, max_page=99)

    # Two pages, then the day's budget was spent: the watermark is the last date listed.
    assert scalar(db, "SELECT count(*) FROM redemptions") == 4
    watermark = scalar(db, "SELECT swept_to FROM verify_watermarks")
    assert watermark == datetime.fromisoformat(fake.redemptions["r_3"]["date"])

    sweep(pool, client(pool, fake.url, clock, per_day=100), page_limit=2, max_page=99)
    assert scalar(db, "SELECT count(*) FROM redemptions") == 5
