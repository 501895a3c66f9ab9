"""Drift healing: a drifting card's missing movement comes from Voucherify's list of its
transactions (``GET /v1/vouchers/{code}/transactions``, cursor paging) and goes through
the same handler as its webhook; the flag is then never raised."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from devtools.fake_voucherify import APP_ID, APP_TOKEN, Failure, fake_voucherify
from devtools.webhooks import CARD_IDS, card_transaction, card_transaction_event, gift_voucher
from tests.conftest import deliver
from tests.jobs.conftest import rows
from workers.jobs.drift import DriftResult, check_drift
from workers.jobs.voucherify_api import Budget, VoucherifyApi

BASE = datetime(2024, 2, 1, 8, 0, tzinfo=UTC)
CODE = gift_voucher(0)["code"]


def _at(minutes: int) -> str:
    return (BASE + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


def test_a_drifting_card_is_healed_from_its_transactions_across_pages(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    # 101 top-ups of 1 since the card's first movement (two pages of 100), one older; the
    # webhook of top-up 50 was lost.
    older = card_transaction("gift", "vtx_old", "CREDITS_ADDITION", 7, 7, _at(-10))
    history = [
        card_transaction("gift", f"vtx_{i:03d}", "CREDITS_ADDITION", 1, 8 + i, _at(i))
        for i in range(101)
    ]
    for transaction in history:
        if transaction["id"] != "vtx_050":
            assert deliver(pool, *card_transaction_event("gift", transaction)) == "processed"

    with fake_voucherify() as fake:
        fake.transactions[CODE] = [older, *history]
        api = VoucherifyApi(fake.url, APP_ID, APP_TOKEN, Budget(pool, 6000, 100_000))
        result = check_drift(pool, time.monotonic() + 60, quiet_seconds=0, api=api)
        pages = [path for path, _ in fake.requests if "/transactions" in path]

    assert (result.cards, result.healed, result.drifting, result.flags_raised) == (1, 1, 0, 0)
    assert len(pages) == 2
    assert "starting_after_id=" in pages[1]
    assert rows(db, "SELECT count(*), sum(amount) FROM ledger_entries") == [(101, 101)]
    # Recorded like a delivery, marked as the drift job's.
    assert rows(
        db,
        "SELECT event_id, status, payload #>> '{source,id}' FROM events"
        " WHERE event_id LIKE 'drift:%%'",
    ) == [("drift:vtx_050", "processed", "drift")]
    assert rows(db, "SELECT count(*) FROM flags") == [(0,)]


def drift_over_a_gap(pool: ConnectionPool, runs: int = 1) -> tuple[DriftResult, list[str]]:
    """A gift card's top-ups of 100 (balance 100) and 100 (balance 250) delivered: the 50
    added between them was never seen, and the API does not list it either. The drift job
    run ``runs`` times with the API: its last result, the transaction listings it asked for."""
    first = card_transaction("gift", "vtx_1", "CREDITS_ADDITION", 100, 100, _at(0))
    last = card_transaction("gift", "vtx_3", "CREDITS_ADDITION", 100, 250, _at(2))
    for transaction in (first, last):
        assert deliver(pool, *card_transaction_event("gift", transaction)) == "processed"

    with fake_voucherify() as fake:
        fake.transactions[CODE] = [first, last]
        api = VoucherifyApi(fake.url, APP_ID, APP_TOKEN, Budget(pool, 6000, 100_000))
        for _ in range(runs):
            result = check_drift(pool, time.monotonic() + 60, quiet_seconds=0, api=api)
        listed = [path for path, _ in fake.requests if "/transactions" in path]
    return result, listed


def test_a_gap_the_api_cannot_explain_is_still_one_flag(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    result, _ = drift_over_a_gap(pool)

    assert (result.healed, result.flags_raised) == (0, 1)
    assert rows(db, "SELECT voucher_id FROM flags WHERE status = 'open'") == [(CARD_IDS["gift"],)]


def test_a_card_the_api_cannot_heal_is_not_tried_again_before_its_back_off(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    _, listed = drift_over_a_gap(pool, runs=3)

    assert len(listed) == 1  # tried once; the next two runs wait for its back-off
    assert rows(db, "SELECT heal_failures FROM card_balances") == [(1,)]
    assert rows(db, "SELECT count(*) FROM flags WHERE status = 'open'") == [(1,)]


def test_a_spent_budget_ends_the_healing_instead_of_trying_every_card(
    pool: ConnectionPool, db: psycopg.Connection[Any]
) -> None:
    for n in range(3):  # three gift cards, each missing a movement
        card = f"v_gift_budget_{n}"
        for tx, amount, after, minutes in ((f"a{n}", 100, 100, 0), (f"c{n}", 100, 250, 2)):
            transaction = card_transaction(
                "gift", f"vtx_{tx}", "CREDITS_ADDITION", amount, after, _at(minutes), card
            )
            assert deliver(pool, *card_transaction_event("gift", transaction)) == "processed"

    with fake_voucherify() as fake:
        api = VoucherifyApi(fake.url, APP_ID, APP_TOKEN, Budget(pool, 6000, per_day=1))
        result = check_drift(pool, time.monotonic() + 60, quiet_seconds=0, api=api)
        calls = len(fake.requests)

    assert calls == 1  # the one call the day allows; the other cards were not tried
    assert api.skipped == 1
    assert result.flags_raised == 3  # still flagged this run, healed on a later one


def test_a_failed_healing_logs_the_card_by_id_with_its_code_masked(
    pool: ConnectionPool, caplog: pytest.LogCaptureFixture
) -> None:
    """A gift card's code can be spent by whoever reads it: the error of a failed listing
    quotes its path (``/v1/vouchers/<code>/transactions``), and the log line masks it."""
    first = card_transaction("gift", "vtx_1", "CREDITS_ADDITION", 100, 100, _at(0))
    last = card_transaction("gift", "vtx_3", "CREDITS_ADDITION", 100, 250, _at(2))
    for transaction in (first, last):
        assert deliver(pool, *card_transaction_event("gift", transaction)) == "processed"

    with fake_voucherify() as fake, caplog.at_level(logging.WARNING, "workers.jobs.drift"):
        fake.fail_first(CODE, *[Failure(400)] * 5)  # a client error: not retried
        api = VoucherifyApi(fake.url, APP_ID, APP_TOKEN, Budget(pool, 6000, 100_000))
        check_drift(pool, time.monotonic() + 60, quiet_seconds=0, api=api)

    [failed] = [r for r in caplog.records if r.getMessage() == "drift.heal_failed"]
    assert "/transactions" in failed.error  # type: ignore[attr-defined]
    assert CODE not in str(failed.__dict__)
    assert failed.voucher_code == "\u2026" + CODE[-4:]  # type: ignore[attr-defined]
