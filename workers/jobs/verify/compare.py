"""Voucherify's answer against our record: pure functions, no database, no API.

``theirs`` is the JSON of ``GET /v1/redemptions/<id>`` as a dict; ``Ours`` is what our
tables hold for the same redemption. From the two: which webhook events our records
miss (``missing_events``), and what still disagrees once they are applied
(``disagreement``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.vocabulary import RedemptionStatus, VoucherType

SUCCEEDED = "redemption.succeeded"
ROLLBACK_SUCCEEDED = "redemption.rollback.succeeded"
FAILED = "redemption.failed"
EVENT_STATUS = {
    SUCCEEDED: RedemptionStatus.SUCCEEDED,
    ROLLBACK_SUCCEEDED: RedemptionStatus.ROLLED_BACK,
    FAILED: RedemptionStatus.FAILED,
}
"""The webhook event types the job can stand in for, and the status each one records."""

STATUSES = frozenset(RedemptionStatus)
CARD_TYPES = frozenset(VoucherType)
DEBITED = (RedemptionStatus.SUCCEEDED, RedemptionStatus.ROLLED_BACK)
"""A card redemption in one of these has a debit in the ledger."""


@dataclass(frozen=True, slots=True)
class Ours:
    """Our record of a redemption: its status and which ledger effects it has."""

    status: str
    voucher_id: str | None
    has_debit: bool
    has_restore: bool


def status_of(value: Any) -> str | None:
    """``"ROLLED BACK"`` and ``"rolled_back"`` both read ``ROLLED_BACK``; None when absent."""
    return str(value).strip().upper().replace(" ", "_") if value else None


def amount_of(obj: dict[str, Any]) -> int | None:
    """Credits or points moved: ``amount``, else ``gift.amount`` / ``loyalty_card.points``."""
    for value in (
        obj.get("amount"),
        (obj.get("gift") or {}).get("amount"),
        (obj.get("loyalty_card") or {}).get("points"),
    ):
        if isinstance(value, int) and not isinstance(value, bool) and value:
            return value
    return None


def is_card(theirs: dict[str, Any]) -> bool:
    """A gift or loyalty card redemption that moved a balance: it has ledger entries."""
    voucher = theirs.get("voucher") or {}
    return str(voucher.get("type") or "").upper() in CARD_TYPES and bool(amount_of(theirs))


def latest_rollback(theirs: dict[str, Any]) -> dict[str, Any] | None:
    """The latest of ``related_redemptions.rollbacks`` (``{id, date}``); None when none."""
    related = theirs.get("related_redemptions") or {}
    rollbacks = [r for r in related.get("rollbacks") or [] if isinstance(r, dict) and r.get("id")]
    if not rollbacks:
        return None
    return max(rollbacks, key=lambda r: str(r.get("date") or ""))


def missing_events(
    theirs: dict[str, Any],
    status: str | None,
    rollback: dict[str, Any] | None,
    ours: Ours | None,
) -> list[str]:
    """The event types, in the order to apply them, whose effects our records lack."""
    card = is_card(theirs)
    events: list[str] = []
    debit_missing = ours is None or (card and not ours.has_debit)
    if status in DEBITED and debit_missing:
        events.append(SUCCEEDED)
    rollback_missing = (
        ours is None
        or ours.status != RedemptionStatus.ROLLED_BACK
        or (card and not ours.has_restore)
    )
    if status == RedemptionStatus.ROLLED_BACK and rollback is not None and rollback_missing:
        events.append(ROLLBACK_SUCCEEDED)
    if status == RedemptionStatus.FAILED and ours is None:
        events.append(FAILED)
    return events


def disagreement(
    theirs: dict[str, Any],
    status: str | None,
    rollback: dict[str, Any] | None,
    ours: Ours | None,
) -> str | None:
    """What a person has to look at; None when our record agrees with Voucherify's."""
    if status not in STATUSES:
        return f"Voucherify reports an unknown status {theirs.get('status')!r}"
    if status == RedemptionStatus.ROLLED_BACK and rollback is None:
        return "Voucherify reports ROLLED_BACK but names no rollback"
    if ours is None:
        return "our record could not be created from Voucherify's answer (see dead letters)"
    if ours.status != status:
        return f"our record is {ours.status}, Voucherify's is {status}"
    if is_card(theirs):
        if status in DEBITED and not ours.has_debit:
            return "the debit is missing from the ledger"
        if status == RedemptionStatus.ROLLED_BACK and not ours.has_restore:
            return "the restore is missing from the ledger"
    return None
