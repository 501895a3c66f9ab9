"""The API budget under what never settles: does verify's window sweep still reach the end
of every day, within the daily cap? Measured against the fake Voucherify, not estimated.

    .venv/bin/python -m bench.verify_budget [--rate 10000] [--days 3] [--flags 20] [--cards 50]

Days of ``--rate`` gift card redemptions a day (``bench.verify_calls.serve_day``: 2 % rolled
back, 0.1 % of the redemptions and 10 % of the rollbacks lost as webhooks), with the
default budget (``VOUCHERIFY_API_CALLS_PER_MINUTE`` 33, ``_PER_DAY`` 500). On top, what
cannot be settled: ``--flags`` review flags whose redemption Voucherify keeps showing as it
was (each check leaves it open), and ``--cards`` drifting cards whose missing movement
Voucherify's transactions do not list either (each heal fails). ``beat``'s schedule is
played over each day: verify every ``VERIFY_INTERVAL_SECONDS`` (900), drift every
``DRIFT_INTERVAL_SECONDS`` (3600), one process each, sharing the budget in PostgreSQL.

Time is simulated: the clock the API client waits on moves only when it sleeps, the
window's end is given to each run, and before each run the times the back-offs wait for
(``flags.next_check_at``, ``card_balances.heal_next_at``) move back by the time that passed.
The day's count of calls starts again each simulated day, as Voucherify's and ours do.

Two runs of the same days, the baseline first: the window sweep alone (no flags, no
cards), then with the flags and cards. Prints per day and run: calls, the watermark's lag
behind the day's end, calls skipped for budget; and the ratio of calls (with / alone).
Fails when the sweep did not reach the end of a day, or a day's calls passed the cap.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from bench.common import conclude
from bench.verify_calls import DAY, record_ours, serve_day
from config.settings import Settings
from devtools.fake_voucherify import APP_ID, APP_TOKEN, FakeVoucherify, fake_voucherify
from devtools.servers import EmbeddedPostgres
from migrations import apply_migrations
from workers.jobs.drift import check_drift
from workers.jobs.runner import VERIFY_OVERLAP_SECONDS
from workers.jobs.verify import verify
from workers.jobs.voucherify_api import SWEEP_SHARE, Budget, VoucherifyApi, sweep_reserve

DEFAULTS = Settings(database_url="", redis_url="")
VERIFY_EVERY = DEFAULTS.verify_interval_seconds
DRIFT_EVERY = DEFAULTS.drift_interval_seconds
SETTLE = DEFAULTS.verify_after_seconds
OVERLAP = VERIFY_OVERLAP_SECONDS
PER_MINUTE = DEFAULTS.voucherify_api_calls_per_minute
PER_DAY = DEFAULTS.voucherify_api_calls_per_day


class Clock:
    """Monotonic and wall time that move only when slept (the pace's waits, the retries)."""

    def __init__(self) -> None:
        self.wall = datetime.now(UTC).timestamp()
        self.mono = time.monotonic()  # the drift job reads the real one for its own loop

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall

    def sleep(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds

    def advance_to(self, wall: float) -> None:
        if wall > self.wall:
            self.sleep(wall - self.wall)


@dataclass
class Day:
    calls: int = 0
    lag_seconds: float = 0.0
    skipped: int = 0
    flags_checked: int = 0
    healed_or_tried: int = 0


PASS_TIME = (
    """
UPDATE flags SET next_check_at = next_check_at - make_interval(secs => %(s)s),
                 verified_at = verified_at - make_interval(secs => %(s)s)
WHERE status = 'open'
""",
    """
UPDATE card_balances SET heal_next_at = heal_next_at - make_interval(secs => %(s)s),
                         heard_at = heard_at - make_interval(secs => %(s)s)
""",
)


def never_settling(pool: ConnectionPool, ours: list[tuple[Any, ...]], flags: int) -> None:
    """Review flags of redemptions Voucherify shows SUCCEEDED: each check leaves them open."""
    succeeded = [r for r, status, _, _ in ours if status == "SUCCEEDED"][:flags]
    with pool.connection() as conn:
        for n, redemption_id in enumerate(succeeded):
            conn.execute(
                "INSERT INTO flags (category, redemption_id, rollback_id, failure_code)"
                " VALUES ('review', %s, %s, 'redemption_too_old')",
                (redemption_id, f"rrf_bench_{n}"),
            )


def unhealable(pool: ConnectionPool, fake: FakeVoucherify, cards: int, at: datetime) -> None:
    """Cards whose ledger misses 50 that Voucherify's transactions do not list either.
    Each has its holder, as its events named: no holder lookup (a one-off call per card,
    ``workers.jobs.card_lookup``) is what never settles."""
    with pool.connection() as conn:
        for n in range(cards):
            card, code = f"v_drift_{n:03d}", f"DRIFT{n:03d}"
            fake.transactions[code] = []
            conn.execute(
                "INSERT INTO card_balances (voucher_id, voucher_code, kind, customer_id,"
                " reported_balance, reported_at, heard_at)"
                " VALUES (%s, %s, 'gift_credit', %s, 250, %s, %s)",
                (card, code, f"cust_drift_{n:03d}", at, at - timedelta(hours=1)),
            )
            for tx, amount, after, minutes in (("a", 100, 100, 0), ("c", 100, 250, 2)):
                conn.execute(
                    "INSERT INTO ledger_entries (voucher_id, voucher_code, kind, amount, effect,"
                    " reason, event_id, moved_at, balance_after, transaction_id)"
                    " VALUES (%s, %s, 'gift_credit', %s, 'movement', 'top-up', %s, %s, %s, %s)",
                    (
                        card,
                        code,
                        amount,
                        f"ev_{card}_{tx}",
                        at + timedelta(minutes=minutes),
                        after,
                        f"vtx_{card}_{tx}",
                    ),
                )


def simulate(url: str, rate: int, days: int, flags: int, cards: int) -> list[Day]:
    start = (datetime.now(UTC) - timedelta(days=days + 1)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    clock = Clock()
    out: list[Day] = []
    with ExitStack() as stack:
        fake = stack.enter_context(fake_voucherify())
        pool = stack.enter_context(ConnectionPool(url, min_size=1, max_size=4))
        with pool.connection() as conn:
            conn.execute(
                "INSERT INTO verify_watermarks (name, swept_to) VALUES ('redemptions', %s)",
                (start,),
            )
        budget = Budget(pool, PER_MINUTE, PER_DAY)

        def new_api() -> VoucherifyApi:  # one client per job run, as the runner makes
            return VoucherifyApi(
                fake.url,
                APP_ID,
                APP_TOKEN,
                budget,
                sleep=clock.sleep,
                clock=clock.monotonic,
                wall_clock=clock.time,
            )

        for day in range(days):
            day_start = start + DAY * day
            ours, _ = serve_day(fake, rate, day_start, tag=f"d{day}")
            record_ours(pool, ours)
            if day == 0:
                never_settling(pool, ours, flags)
                unhealable(pool, fake, cards, day_start)
            with pool.connection() as conn:
                conn.execute("DELETE FROM voucherify_api_calls")  # a new day's count
            figures = Day()
            requests_before = len(fake.requests)
            steps = int(DAY.total_seconds() // VERIFY_EVERY)
            for k in range(1, steps + 1):
                at = day_start + timedelta(seconds=k * VERIFY_EVERY)
                clock.advance_to(at.timestamp())
                with pool.connection() as conn:
                    for statement in PASS_TIME:
                        conn.execute(statement, {"s": VERIFY_EVERY})
                api = new_api()
                result = verify(pool, api, SETTLE, OVERLAP, 100, clock.monotonic() + 600, now=at)
                figures.flags_checked += result.checked
                figures.skipped += api.skipped
                if (k * VERIFY_EVERY) % DRIFT_EVERY == 0:
                    api = new_api()
                    with api.leaving(sweep_reserve(api)):
                        drift = check_drift(pool, clock.monotonic() + 600, 500, 0, api=api)
                    figures.healed_or_tried += drift.healed
                    figures.skipped += api.skipped
            figures.calls = len(fake.requests) - requests_before
            with pool.connection() as conn:
                row = conn.execute(
                    "SELECT swept_to FROM verify_watermarks WHERE name = 'redemptions'"
                ).fetchone()
            assert row is not None
            # The last run's window ends SETTLE before the day's end, by design.
            figures.lag_seconds = (day_start + DAY - row[0]).total_seconds() - SETTLE
            out.append(figures)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=10_000)
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--flags", type=int, default=20)
    parser.add_argument("--cards", type=int, default=50)
    args = parser.parse_args(argv)
    logging.disable(logging.ERROR)  # the jobs log each heal, skip and flag: not the figures
    workdir = Path(tempfile.mkdtemp(prefix="verify-budget-"))
    postgres = EmbeddedPostgres(workdir / "pg", durable=False)
    postgres.start()
    problems: list[str] = []
    print(
        f"{args.rate:,} redemptions a day, {args.days} days; budget {PER_MINUTE}/min, "
        f"{PER_DAY}/day ({SWEEP_SHARE:.0%} kept for the window sweep); "
        f"verify every {VERIFY_EVERY} s, drift every {DRIFT_EVERY} s"
    )
    runs: dict[str, list[Day]] = {}
    try:
        for n, (name, flags, cards) in enumerate(
            (
                ("sweep alone", 0, 0),
                (f"+{args.flags} flags, +{args.cards} cards", args.flags, args.cards),
            )
        ):
            dbname = f"verify_budget_{n}"
            with psycopg.connect(postgres.url(), autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {dbname}")
            with psycopg.connect(postgres.url(dbname), autocommit=True) as conn:
                apply_migrations(conn)
            runs[name] = simulate(postgres.url(dbname), args.rate, args.days, flags, cards)
    finally:
        postgres.stop()
    header = ("run", "day", "calls", "skipped", "flags tried", "sweep lag (s)")
    print("{:>28} {:>3} {:>6} {:>7} {:>11} {:>13}".format(*header))
    for name, days in runs.items():
        for d, figures in enumerate(days, 1):
            print(
                f"{name:>28} {d:>3} {figures.calls:>6} {figures.skipped:>7} "
                f"{figures.flags_checked:>11} {figures.lag_seconds:>13.0f}"
            )
            if figures.lag_seconds > 0:
                problems.append(
                    f"{name}, day {d}: the sweep ended {figures.lag_seconds:.0f} s short"
                )
            if figures.calls > PER_DAY:
                problems.append(f"{name}, day {d}: {figures.calls} calls, over the cap {PER_DAY}")
    alone, loaded = runs.values()
    ratios = [b.calls / a.calls if a.calls else 0.0 for a, b in zip(alone, loaded, strict=True)]
    print("calls with / alone, per day: " + ", ".join(f"{r:.2f}" for r in ratios))
    return conclude(problems, workdir, "FAILED:\n  {problems}\n(kept {workdir})")


if __name__ == "__main__":
    sys.exit(main())
