"""API calls per day of the verify job, measured against the fake Voucherify, not estimated.

    .venv/bin/python -m bench.verify_calls [--rates 1000,10000,100000]

For each rate: one day of gift card redemptions, evenly spread, 2 % of them rolled back
3 hours later; 0.1 % of the redemptions and 10 % of the rollbacks never reached us as
webhooks. Voucherify's side is the fake of the tests (``devtools/fake_voucherify.py``, the
published answers' shapes, over HTTP on loopback); our side is the rows the delivered
webhooks leave (written straight into a fresh PostgreSQL: the job reads rows, not how they
came). Then the job runs as ``beat`` runs it, every ``VERIFY_INTERVAL_SECONDS`` (900) over
the day, with the default ``VERIFY_AFTER_SECONDS`` (3600) and ``VERIFY_OVERLAP_SECONDS``
(900); the window's end is given to each run, so a day takes seconds, and the budget is
not capped, so what is measured is what the job needs. Every request the fake received is
counted. Prints, per rate, the calls per day, redemptions / 100 and their ratio, the
busiest run's calls and whether the default budget (33 a minute, 500 a day) holds them;
fails when a lost webhook was not healed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from bench.common import conclude
from config.settings import Settings
from devtools.fake_voucherify import (
    APP_ID,
    APP_TOKEN,
    FakeVoucherify,
    api_redemption,
    api_rollback,
    fake_voucherify,
)
from devtools.servers import EmbeddedPostgres
from migrations import apply_migrations
from workers.jobs.runner import VERIFY_OVERLAP_SECONDS
from workers.jobs.verify import verify
from workers.jobs.voucherify_api import Budget, VoucherifyApi

DEFAULTS = Settings(database_url="", redis_url="")
INTERVAL = DEFAULTS.verify_interval_seconds
SETTLE = DEFAULTS.verify_after_seconds
OVERLAP = VERIFY_OVERLAP_SECONDS
DAY = timedelta(days=1)
ROLLED_BACK_EVERY = 50  # 2 %
LOST_REDEMPTION_EVERY = 1000  # 0.1 %
LOST_ROLLBACK_EVERY = 10  # of the rollbacks
ROLLBACK_AFTER = timedelta(hours=3)
AMOUNT = 2000


def stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def serve_day(
    fake: FakeVoucherify, rate: int, start: datetime, tag: str = ""
) -> tuple[list[tuple[Any, ...]], int]:
    """Voucherify's day in the fake; the rows of our records of what was delivered, and the
    number of rollbacks. Items share the template's nested objects (memory); ``tag`` keeps
    the ids of several days apart."""
    template = api_redemption("gift", "r_template", AMOUNT)
    rollback_template = api_rollback("gift", "rr_template", "r_template", AMOUNT)
    step = DAY / rate
    ours: list[tuple[Any, ...]] = []
    objects: list[dict[str, Any]] = []
    rollbacks = 0
    for i in range(rate):
        redemption_id, rollback_id = f"r{tag}_{i:07d}", f"rr{tag}_{i:07d}"
        redeemed = start + step * (i + 0.5)
        rolled = i % ROLLED_BACK_EVERY == 0 and redeemed + ROLLBACK_AFTER < start + DAY
        status = "ROLLED_BACK" if rolled else "SUCCEEDED"
        related = [{"id": rollback_id, "date": stamp(redeemed + ROLLBACK_AFTER)}] if rolled else []
        objects.append(
            {
                **template,
                "id": redemption_id,
                "date": stamp(redeemed),
                "status": status,
                "related_redemptions": {"rollbacks": related, "redemptions": []},
            }
        )
        rollback_lost = False
        if rolled:
            rollbacks += 1
            rollback_lost = rollbacks % LOST_ROLLBACK_EVERY == 0
            objects.append(
                {
                    **rollback_template,
                    "id": rollback_id,
                    "redemption": redemption_id,
                    "date": stamp(redeemed + ROLLBACK_AFTER),
                }
            )
        if i % LOST_REDEMPTION_EVERY != LOST_REDEMPTION_EVERY - 1:
            our_status = "ROLLED_BACK" if rolled and not rollback_lost else "SUCCEEDED"
            ours.append((redemption_id, our_status, redeemed, our_status == "ROLLED_BACK"))
    fake.add(*objects)
    return ours, rollbacks


COPY_LEDGER = (
    "COPY ledger_entries (voucher_id, kind, amount, redemption_id, effect, reason, event_id)"
    " FROM STDIN"
)
COPY_LEDGER_DATED = (
    "COPY ledger_entries (voucher_id, kind, amount, redemption_id, effect, reason, event_id,"
    " moved_at) FROM STDIN"
)
LEDGER_COLUMNS = "SELECT column_name FROM information_schema.columns WHERE table_name = %s"


def record_ours(pool: ConnectionPool, ours: list[tuple[Any, ...]]) -> None:
    """What the delivered webhooks left: the redemptions, their debits and restores."""
    with pool.connection() as conn:
        columns = {row[0] for row in conn.execute(LEDGER_COLUMNS, ("ledger_entries",))}
    # The card ledger (migrations/0006) dates each movement: with it, moved_at too.
    dated = "moved_at" in columns
    with pool.connection() as conn, conn.transaction(), conn.cursor() as cursor:
        with cursor.copy(
            "COPY redemptions (redemption_id, status, voucher_id, voucher_type, amount,"
            " redeemed_at) FROM STDIN"
        ) as copy:
            for redemption_id, status, redeemed, _ in ours:
                copy.write_row((redemption_id, status, "v_bench", "GIFT_VOUCHER", AMOUNT, redeemed))
        with cursor.copy(COPY_LEDGER_DATED if dated else COPY_LEDGER) as copy:
            for redemption_id, _, redeemed, restored in ours:
                when = (redeemed,) if dated else ()
                row = ("v_bench", "gift_credit", -AMOUNT, redemption_id, "debit", "redemption")
                copy.write_row((*row, f"ev_{redemption_id}", *when))
                if restored:
                    row = ("v_bench", "gift_credit", AMOUNT, redemption_id, "restore", "rollback")
                    copy.write_row((*row, f"ev_rr_{redemption_id}", *when))


def measure(url: str, rate: int) -> dict[str, Any]:
    start = (datetime.now(UTC) - timedelta(days=2)).replace(microsecond=0)
    with fake_voucherify() as fake, ConnectionPool(url, min_size=1, max_size=4) as pool:
        ours, rollbacks = serve_day(fake, rate, start)
        record_ours(pool, ours)
        with pool.connection() as conn:
            conn.execute(
                "INSERT INTO verify_watermarks (name, swept_to) VALUES ('redemptions', %s)",
                (start,),
            )
        budget = Budget(pool, per_minute=10**9, per_day=10**9)
        api = VoucherifyApi(fake.url, APP_ID, APP_TOKEN, budget, sleep=lambda _: None)
        busiest, applied, began = 0, 0, time.monotonic()
        runs = int(DAY.total_seconds() // INTERVAL)
        for k in range(1, runs + 1):
            before = len(fake.requests)
            now = start + timedelta(seconds=SETTLE + k * INTERVAL)
            result = verify(pool, api, SETTLE, OVERLAP, 100, time.monotonic() + 600, now=now)
            applied += result.applied
            busiest = max(busiest, len(fake.requests) - before)
        calls = len(fake.requests)
        with pool.connection() as conn:
            counts = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE status = 'ROLLED_BACK') FROM redemptions"
            ).fetchone()
            restores = conn.execute(
                "SELECT count(*) FROM ledger_entries WHERE effect = 'restore'"
            ).fetchone()
    assert counts is not None
    assert restores is not None
    return {
        "rate": rate,
        "runs": runs,
        "calls": calls,
        "ratio": calls / (rate / 100),
        "busiest": busiest,
        "applied": applied,
        "healed": counts[0] == rate and counts[1] == rollbacks and restores[0] == rollbacks,
        "seconds": time.monotonic() - began,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1000,10000,100000")
    args = parser.parse_args(argv)
    rates = [int(r) for r in args.rates.split(",")]
    logging.disable(logging.WARNING)  # the job logs each heal: not the figures
    workdir = Path(tempfile.mkdtemp(prefix="verify-calls-"))
    postgres = EmbeddedPostgres(workdir / "pg", durable=False)
    postgres.start()
    problems: list[str] = []
    per_minute, per_day = (
        DEFAULTS.voucherify_api_calls_per_minute,
        DEFAULTS.voucherify_api_calls_per_day,
    )
    print(
        f"verify every {INTERVAL} s, settle {SETTLE} s, overlap {OVERLAP} s; "
        f"{100 // ROLLED_BACK_EVERY} % rolled back; lost: {100 / LOST_REDEMPTION_EVERY} % of "
        f"redemptions, {100 // LOST_ROLLBACK_EVERY} % of rollbacks"
    )
    print(
        f"{'redemptions/day':>15} {'calls/day':>9} {'redemptions/100':>15} {'ratio':>6} "
        f"{'busiest run':>11} {'applied':>7} {'fits default budget':>19}"
    )
    try:
        for n, rate in enumerate(rates):
            dbname = f"verify_calls_{n}"
            with psycopg.connect(postgres.url(), autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {dbname}")
            with psycopg.connect(postgres.url(dbname), autocommit=True) as conn:
                apply_migrations(conn)
            row = measure(postgres.url(dbname), rate)
            fits = row["calls"] <= per_day and row["busiest"] <= per_minute
            print(
                f"{rate:>15,} {row['calls']:>9,} {rate / 100:>15,.0f} {row['ratio']:>6.2f} "
                f"{row['busiest']:>11} {row['applied']:>7} {'yes' if fits else 'no':>19}"
                f"   ({row['seconds']:.0f} s)"
            )
            if not row["healed"]:
                problems.append(f"{rate}/day: a lost webhook was not healed")
    finally:
        postgres.stop()
    return conclude(problems, workdir, "FAILED:\n  {problems}\n(kept {workdir})")


if __name__ == "__main__":
    sys.exit(main())
