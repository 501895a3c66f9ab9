"""The pipeline's words, once: statuses, outcomes, ledger kinds and effects, flag categories.

Every module that writes or filters one of these values names it from here; the SQL CHECK
constraints of ``migrations/`` list the same values (``tests/schemas/test_vocabulary.py``
compares them with the migrated database). ``StrEnum``: each member is its text, so it
goes into SQL parameters, JSON and log lines as that text.
"""

from __future__ import annotations

from enum import StrEnum


class EventStatus(StrEnum):
    """``events.status``: where one event is in the inbox."""

    RECEIVED = "received"
    PROCESSED = "processed"
    IGNORED = "ignored"
    FAILED = "failed"
    DEAD = "dead"


FINAL_STATUSES = frozenset({EventStatus.PROCESSED, EventStatus.IGNORED, EventStatus.DEAD})
"""A later delivery of an event in one of these is a duplicate."""
UNFINISHED_STATUSES = (EventStatus.RECEIVED, EventStatus.FAILED)
"""What the re-drive job waits on and the gauges count as waiting."""


class DeliveryOutcome(StrEnum):
    """``deliveries.outcome``: what became of one delivery (an event may have several)."""

    RECEIVED = "received"
    PROCESSED = "processed"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"
    FAILED = "failed"
    DEAD = "dead"


class RedemptionStatus(StrEnum):
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"


class OrderStatus(StrEnum):
    CREATED = "CREATED"
    PAID = "PAID"
    FULFILLED = "FULFILLED"
    CANCELED = "CANCELED"


class VoucherType(StrEnum):
    """Voucherify's ``voucher.type`` values that move a balance."""

    GIFT_VOUCHER = "GIFT_VOUCHER"
    LOYALTY_CARD = "LOYALTY_CARD"


class LedgerKind(StrEnum):
    """``ledger_entries.kind`` / ``card_balances.kind``: what a card holds."""

    GIFT_CREDIT = "gift_credit"
    LOYALTY_POINTS = "loyalty_points"


LEDGER_KIND_OF_VOUCHER = {
    VoucherType.GIFT_VOUCHER: LedgerKind.GIFT_CREDIT,
    VoucherType.LOYALTY_CARD: LedgerKind.LOYALTY_POINTS,
}


class LedgerEffect(StrEnum):
    """``ledger_entries.effect``: a redemption's debit and its rollback's restore (at most one
    of each per redemption), or a movement of no redemption (a top-up, an accrual, an
    expiry, a manual change: one per transaction id)."""

    DEBIT = "debit"
    RESTORE = "restore"
    MOVEMENT = "movement"


class TransactionType(StrEnum):
    """Voucherify's card transaction types that belong to a redemption or its rollback: the
    same ledger entry as the redemption or rollback webhook's (``details.redemption.id``)."""

    CREDITS_REDEMPTION = "CREDITS_REDEMPTION"
    CREDITS_REFUND = "CREDITS_REFUND"
    POINTS_REDEMPTION = "POINTS_REDEMPTION"
    POINTS_REFUND = "POINTS_REFUND"


EFFECT_OF_TRANSACTION: dict[str, LedgerEffect] = {
    TransactionType.CREDITS_REDEMPTION: LedgerEffect.DEBIT,
    TransactionType.POINTS_REDEMPTION: LedgerEffect.DEBIT,
    TransactionType.CREDITS_REFUND: LedgerEffect.RESTORE,
    TransactionType.POINTS_REFUND: LedgerEffect.RESTORE,
}


class FlagCategory(StrEnum):
    ALREADY_ROLLED_BACK = "already_rolled_back"
    REVIEW = "review"
    DRIFT = "drift"
    LOST_ROLLBACK = "lost_rollback"
    """An ``already_rolled_back`` failure whose payload shows the redemption ``ROLLED_BACK``
    while our record is not: the rollback's webhook was lost, the restore is missing."""


class FlagStatus(StrEnum):
    OPEN = "open"
    RESOLVED = "resolved"


class ActionKind(StrEnum):
    """``flag_actions.kind``: what a person asks done about a flag through Voucherify's API."""

    COMPENSATE = "compensate"
    RETRY = "retry"
    SETTLE = "settle"


class ActionState(StrEnum):
    """``flag_actions.state``: ``pending`` and ``unknown`` are open (looked up before
    anything is sent again)."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"


class JobName(StrEnum):
    """The reconciliation jobs (``workers.jobs.runner.JOBS``, ``job_runs.job``)."""

    REDRIVE = "redrive"
    VERIFY = "verify"
    DRIFT = "drift"
    RETENTION = "retention"


class JobOutcome(StrEnum):
    """``job_runs.outcome``."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"


CHECKED_COLUMNS: dict[tuple[str, str], type[StrEnum]] = {
    ("events", "status"): EventStatus,
    ("deliveries", "outcome"): DeliveryOutcome,
    ("orders", "status"): OrderStatus,
    ("redemptions", "status"): RedemptionStatus,
    ("ledger_entries", "kind"): LedgerKind,
    ("ledger_entries", "effect"): LedgerEffect,
    ("card_balances", "kind"): LedgerKind,
    ("flags", "category"): FlagCategory,
    ("flags", "status"): FlagStatus,
    ("job_runs", "outcome"): JobOutcome,
    ("flag_actions", "kind"): ActionKind,
    ("flag_actions", "state"): ActionState,
}
"""Each column with a CHECK (col IN (...)) and the enum that lists the same values."""


def values(enum: type[StrEnum]) -> tuple[str, ...]:
    return tuple(member.value for member in enum)
