"""What the verify job checks this run: claimed in one statement, given back when unchecked.

A claim stamps ``verified_at = now()`` on a batch of due rows (``FOR UPDATE SKIP LOCKED``:
two runs never take the same row) and returns each with the ``verified_at`` it had
before. A row the run could not check after all -- out of time, or Voucherify did not
answer -- gets that previous value back, so it comes first again next run.

The rows claimed this way (``work_through``) are the open flags of a failed rollback
(``FLAGS``): each is few, and is checked by its redemption's id. Redemptions themselves
are not polled one by one: the job lists them by creation time (``window``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, LiteralString, Protocol, TypeVar

from psycopg.rows import class_row
from psycopg_pool import ConnectionPool

from schemas.vocabulary import FlagCategory, FlagStatus
from workers.jobs.voucherify_api import BudgetExhausted, VoucherifyApiError

CLAIM_FLAGS = """
WITH due AS (
    SELECT id, verified_at FROM flags
    WHERE status = %(open)s AND category = ANY(%(categories)s)
      AND redemption_id IS NOT NULL
      AND (verified_at IS NULL OR verified_at < now() - make_interval(secs => %(after)s))
    ORDER BY verified_at NULLS FIRST, id
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
UPDATE flags f SET verified_at = now() FROM due WHERE f.id = due.id
RETURNING f.id, f.category, f.redemption_id, f.failure_code, due.verified_at AS previous
"""

UNCLAIM_FLAG = "UPDATE flags SET verified_at = %(previous)s WHERE id = %(id)s"


class Claimed(Protocol):
    @property
    def key(self) -> int | str:
        """What the un-claim statement's ``%(id)s`` names."""

    @property
    def redemption_id(self) -> str: ...

    @property
    def previous(self) -> datetime | None: ...


@dataclass(frozen=True, slots=True)
class FlagClaim:
    id: int
    category: str
    redemption_id: str
    failure_code: str | None
    previous: datetime | None

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


def claim(pool: ConnectionPool, kind: Claims[C], after_seconds: int, batch_size: int) -> list[C]:
    """Stamp and return a batch of due rows, those checked longest ago first."""
    params = {**kind.params, "after": after_seconds, "batch": batch_size}
    with pool.connection() as conn, conn.transaction():
        cursor = conn.cursor(row_factory=class_row(kind.row))
        return cursor.execute(kind.claim, params).fetchall()


def unclaim(pool: ConnectionPool, kind: Claims[C], items: Sequence[C]) -> None:
    """Give back the check of items not checked after all, so they come first next run."""
    if not items:
        return
    with pool.connection() as conn, conn.transaction():
        for item in items:
            conn.execute(kind.unclaim, {"id": item.key, "previous": item.previous})


def work_through(
    pool: ConnectionPool,
    kind: Claims[C],
    after_seconds: int,
    batch_size: int,
    deadline: float,
    check: Callable[[C], object],
    failed: Callable[[C, VoucherifyApiError], object],
) -> bool:
    """Claim a batch and ``check`` each row in turn; False when the deadline or the API
    budget cut it short (the rows left are given back).

    A row whose check raised ``VoucherifyApiError`` is given back and reported to
    ``failed``; when the error is permanent (wrong credentials), the rows left are given
    back too and the error goes up: no other request of this run can succeed.
    """
    items = claim(pool, kind, after_seconds, batch_size)
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
            unclaim(pool, kind, [item])
            if exc.permanent:
                unclaim(pool, kind, items[index + 1 :])
                raise
            failed(item, exc)
    return True
