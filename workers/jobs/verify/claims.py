"""What the verify job checks this run: claimed in one statement, given back when unchecked.

A claim stamps ``verified_at = now()`` on a batch of due rows (``FOR UPDATE SKIP LOCKED``:
two runs never take the same row) and returns each with the ``verified_at`` it had
before. A row the run could not check after all -- out of time, or Voucherify did not
answer -- gets that previous value back, so it comes first again next run.

Two kinds of row are claimed, the same way (``work_through``): open flags of a failed
rollback (``FLAGS``) and redemptions without a final state (``REDEMPTIONS``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, LiteralString, Protocol, TypeVar

from psycopg.rows import class_row
from psycopg_pool import ConnectionPool

from schemas.vocabulary import FlagCategory, FlagStatus, LedgerEffect, VoucherType
from workers.jobs.voucherify_api import VoucherifyApiError

ROLLBACK_WINDOW_DAYS = 92
"""Voucherify rolls back redemptions up to 3 months old: past that, SUCCEEDED is final."""

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

# The statuses are written out, not parameters: they are the predicate of the partial
# index redemptions_verify (migrations/0003_jobs.sql), and the planner matches a partial
# index against constants only -- a prepared statement's generic plan would ignore it.
CLAIM_REDEMPTIONS = """
WITH due AS (
    SELECT r.redemption_id, r.verified_at FROM redemptions r
    WHERE COALESCE(r.last_event_at, r.updated_at) < now() - make_interval(secs => %(after)s)
      AND (r.verified_at IS NULL OR r.verified_at < now() - make_interval(secs => %(after)s))
      AND (
        (r.status = 'SUCCEEDED'
         AND COALESCE(r.redeemed_at, r.last_event_at, r.created_at)
             > now() - make_interval(days => %(window_days)s))
        OR (r.status = 'ROLLED_BACK' AND r.voucher_type = ANY(%(card_types)s)
            AND COALESCE(r.amount, 0) <> 0
            AND (NOT EXISTS (SELECT 1 FROM ledger_entries l
                             WHERE l.redemption_id = r.redemption_id AND l.effect = %(debit)s)
                 OR NOT EXISTS (SELECT 1 FROM ledger_entries l
                                WHERE l.redemption_id = r.redemption_id
                                  AND l.effect = %(restore)s)))
      )
    ORDER BY r.verified_at NULLS FIRST, r.last_event_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)
UPDATE redemptions r SET verified_at = now() FROM due
WHERE r.redemption_id = due.redemption_id
RETURNING r.redemption_id, due.verified_at AS previous
"""

UNCLAIM_FLAG = "UPDATE flags SET verified_at = %(previous)s WHERE id = %(id)s"
UNCLAIM_REDEMPTION = (
    "UPDATE redemptions SET verified_at = %(previous)s WHERE redemption_id = %(id)s"
)


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


@dataclass(frozen=True, slots=True)
class RedemptionClaim:
    redemption_id: str
    previous: datetime | None

    @property
    def key(self) -> str:
        return self.redemption_id


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
        "categories": [FlagCategory.ALREADY_ROLLED_BACK, FlagCategory.REVIEW],
    },
)
REDEMPTIONS = Claims(
    CLAIM_REDEMPTIONS,
    UNCLAIM_REDEMPTION,
    RedemptionClaim,
    {
        "window_days": ROLLBACK_WINDOW_DAYS,
        "card_types": list(VoucherType),
        "debit": LedgerEffect.DEBIT,
        "restore": LedgerEffect.RESTORE,
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
    """Claim a batch and ``check`` each row in turn; False when the deadline cut it short.

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
        except VoucherifyApiError as exc:
            unclaim(pool, kind, [item])
            if exc.permanent:
                unclaim(pool, kind, items[index + 1 :])
                raise
            failed(item, exc)
    return True
