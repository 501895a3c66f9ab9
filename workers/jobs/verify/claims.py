"""What the verify job checks this run: claimed in one statement, given back when unchecked.

A claim stamps ``verified_at = now()`` and the next check time (exponential back-off) on a
batch of due rows (``FOR UPDATE SKIP LOCKED``: two runs never take the same row) and
returns each with the values it had before. A row the run could not check after all --
out of time or budget -- gets them back, so it comes first again next run; one whose
call failed keeps its back-off.

The rows claimed this way (``work_through``) are the open flags of a failed rollback
(``FLAGS``): each is few, and is checked by its redemption's id. Redemptions themselves
are not polled one by one: the job lists them by creation time (``window``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, LiteralString, Protocol, TypeVar

from psycopg.rows import class_row
from psycopg_pool import ConnectionPool

from schemas.vocabulary import FlagCategory, FlagStatus
from workers.jobs.voucherify_api import BudgetExhausted, VoucherifyApiError

# Due: never checked, or its next check time has come. The claim is the check's back-off:
# the next check waits ``after`` x 2^failures (at most MAX_BACKOFF), so a flag that does
# not settle, or whose call fails, costs fewer calls each day; a check that resolves it
# ends it. A flag the run could not check after all gets its three values back.
CLAIM_FLAGS = """
WITH due AS (
    SELECT id, verified_at, next_check_at, check_failures FROM flags
    WHERE status = %(open)s AND category = ANY(%(categories)s)
      AND redemption_id IS NOT NULL
      AND (next_check_at IS NULL OR next_check_at <= now())
      AND (verified_at IS NULL OR verified_at < %(not_since)s)  -- compared by this run
    ORDER BY next_check_at NULLS FIRST, id
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
UPDATE flags f
SET verified_at = now(),
    check_failures = f.check_failures + 1,
    next_check_at = now() + make_interval(
        secs => LEAST(%(after)s * 2 ^ LEAST(f.check_failures, 20), %(max_backoff)s))
FROM due WHERE f.id = due.id
RETURNING f.id, f.category, f.redemption_id, f.failure_code, due.verified_at AS previous,
          due.next_check_at AS previous_next, due.check_failures AS previous_failures
"""

UNCLAIM_FLAG = """
UPDATE flags SET verified_at = %(previous)s, next_check_at = %(previous_next)s,
                 check_failures = %(previous_failures)s
WHERE id = %(id)s
"""
MAX_BACKOFF_SECONDS = 7 * 86400
"""The longest a flag waits between two checks (once it has failed often)."""


class Claimed(Protocol):
    @property
    def key(self) -> int | str:
        """What the un-claim statement's ``%(id)s`` names."""

    @property
    def redemption_id(self) -> str: ...

    @property
    def previous(self) -> datetime | None: ...

    @property
    def previous_next(self) -> datetime | None: ...

    @property
    def previous_failures(self) -> int: ...


@dataclass(frozen=True, slots=True)
class FlagClaim:
    id: int
    category: str
    redemption_id: str
    failure_code: str | None
    previous: datetime | None
    previous_next: datetime | None
    previous_failures: int

    @property
    def key(self) -> int:
        return self.id


C = TypeVar("C", bound=Claimed)


@dataclass(frozen=True, slots=True)
class Claims(Generic[C]):
    """One kind of claimed row: its two statements and the class of its rows."""

    claim: LiteralString
    unclaim: LiteralString
    row: type[C]
    params: dict[str, Any]


FLAGS = Claims(
    CLAIM_FLAGS,
    UNCLAIM_FLAG,
    FlagClaim,
    {
        "open": FlagStatus.OPEN,
        "categories": [
            FlagCategory.ALREADY_ROLLED_BACK,
            FlagCategory.LOST_ROLLBACK,
            FlagCategory.REVIEW,
        ],
    },
)


def claim(
    pool: ConnectionPool,
    kind: Claims[C],
    after_seconds: int,
    batch_size: int,
    not_since: datetime | None = None,
) -> list[C]:
    """Stamp and return a batch of due rows, those due longest first; none compared at or
    after ``not_since`` (this run's start: what it has just raised or compared)."""
    params = {
        **kind.params,
        "after": after_seconds,
        "batch": batch_size,
        "max_backoff": MAX_BACKOFF_SECONDS,
        "not_since": not_since or datetime.max.replace(tzinfo=UTC),
    }
    with pool.connection() as conn, conn.transaction():
        cursor = conn.cursor(row_factory=class_row(kind.row))
        return cursor.execute(kind.claim, params).fetchall()


def unclaim(pool: ConnectionPool, kind: Claims[C], items: Sequence[C]) -> None:
    """Give back the check of items not checked after all, so they come first next run."""
    if not items:
        return
    with pool.connection() as conn, conn.transaction():
        for item in items:
            conn.execute(
                kind.unclaim,
                {
                    "id": item.key,
                    "previous": item.previous,
                    "previous_next": item.previous_next,
                    "previous_failures": item.previous_failures,
                },
            )


def work_through(
    pool: ConnectionPool,
    kind: Claims[C],
    after_seconds: int,
    batch_size: int,
    deadline: float,
    check: Callable[[C], object],
    failed: Callable[[C, VoucherifyApiError], object],
    not_since: datetime | None = None,
) -> bool:
    """Claim a batch and ``check`` each row in turn; False when the deadline or the API
    budget cut it short (the rows left are given back).

    A row whose check raised ``VoucherifyApiError`` keeps its claim (its back-off grows:
    a flag whose call keeps failing does not come first in every run) and is reported to
    ``failed``; when the error is permanent (wrong credentials), it and the rows left are
    given back and the error goes up: no other request of this run can succeed.
    """
    items = claim(pool, kind, after_seconds, batch_size, not_since)
    for index, item in enumerate(items):
        if time.monotonic() >= deadline:
            unclaim(pool, kind, items[index:])
            return False
        try:
            check(item)
        except BudgetExhausted:
            unclaim(pool, kind, items[index:])
            return False
        except VoucherifyApiError as exc:
            if exc.permanent:
                unclaim(pool, kind, items[index:])
                raise
            failed(item, exc)
    return True
