"""What the verify tests share: dates, the run, our records of redemptions and rollbacks, a
failed-rollback flag (the fixtures: ``tests/conftest.py``, ``tests/jobs/conftest.py``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from devtools.fake_voucherify import (
    ROLLBACK_WINDOW_KEY,
    FakeVoucherify,
    api_redemption,
    api_voucher,
)
from devtools.webhooks import card_redemption, card_rollback, card_rollback_failed, gift_voucher
from tests.conftest import deliver
from tests.jobs.conftest import Clock, rows
from workers.jobs.verify import VerifyResult, verify
from workers.jobs.voucherify_api import VoucherifyApi

SETTLE = 60
OVERLAP = 900


def ago(**delta: float) -> str:
    """A Voucherify date (UTC, milliseconds, ``Z``) that long ago."""
    moment = datetime.now(UTC) - timedelta(**delta)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Within the first run's window (a day back), older than the settle time.
REDEEMED = ago(hours=3)
ROLLED = ago(hours=2)


def run(
    pool: ConnectionPool, api: VoucherifyApi, clock: Clock | None = None, budget: float = 60
) -> VerifyResult:
    start = clock.monotonic() if clock else api.clock()
    return verify(pool, api, SETTLE, OVERLAP, batch_size=50, deadline=start + budget)


def ledger(db: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return rows(
        db,
        "SELECT redemption_id, effect, amount FROM ledger_entries ORDER BY redemption_id, effect",
    )


def redeem(pool: ConnectionPool, redemption_id: str, date: str = REDEEMED) -> None:
    """Our record of a gift card redemption of 2000, from its webhook."""
    deliver(
        pool, "redemption.succeeded", card_redemption("gift", redemption_id, 2000, 8000, date=date)
    )


def roll_back(pool: ConnectionPool, redemption_id: str, rollback_id: str) -> None:
    """Our record of its rollback, from its webhook."""
    data = card_rollback("gift", redemption_id, rollback_id, 2000, 10000, date=ROLLED)
    deliver(pool, "redemption.rollback.succeeded", data)


CARD = gift_voucher(0)
CARD_ID, CARD_CODE = CARD["id"], CARD["code"]
"""The gift card ``card_redemption`` redeems by default."""
RETRY_REASON = "customer returned the order"
"""The reason of the failed rollback ``failed_rollback_flag`` makes."""


def failed_rollback_flag(
    pool: ConnectionPool,
    db: psycopg.Connection[Any],
    fake: FakeVoucherify,
    code: str = ROLLBACK_WINDOW_KEY,
    redemption_id: str = "r_1",
) -> int:
    """A gift card redemption of 2000 (balance 8000 after it), its rollback refused with
    ``code``; the fake knows the redemption and the card."""
    deliver(
        pool,
        "redemption.succeeded",
        card_redemption("gift", redemption_id, 2000, 8000, date=REDEEMED),
    )
    failed = card_rollback_failed(redemption_id, f"rr_{redemption_id}", code, voucher_id=CARD_ID)
    failed["redemption_rollback"]["reason"] = RETRY_REASON
    deliver(pool, "redemption.rollback.failed", failed)
    theirs = api_redemption("gift", redemption_id, 2000, date=REDEEMED, voucher_id=CARD_ID)
    theirs["tracking_id"] = "track_1"
    fake.add(theirs)
    fake.vouchers[CARD_CODE] = api_voucher("gift", CARD_ID, CARD_CODE, balance=8000)
    [(flag_id,)] = rows(db, "SELECT id FROM flags WHERE redemption_id = %s", redemption_id)
    return int(flag_id)
