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
ROLLBACK_FAILED = "redemption.rollback.failed"
FAILED = "redemption.failed"
ORDER_UPDATED = "customer.order.updated"
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


def status_from(theirs: dict[str, Any]) -> str | None:
    """The redemption's status; from its ``result`` when the answer has no ``status`` (the
    published examples have none): SUCCESS is SUCCEEDED, FAILURE is FAILED."""
    status = status_of(theirs.get("status"))
    if status:
        return status
    result = str(theirs.get("result") or "").upper()
    return {"SUCCESS": RedemptionStatus.SUCCEEDED, "FAILURE": RedemptionStatus.FAILED}.get(result)


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


def card_type(obj: dict[str, Any]) -> VoucherType | None:
    """Which card a redemption or rollback moved, from Voucherify's answer; None: no card.

    The REST answers (``GET /v1/redemptions/<id>``, the listing) carry the kind in their
    top-level ``gift`` (credits) or ``loyalty_card`` (points) object; their ``voucher`` has
    no ``type``. A ``voucher.type``, where one is given, says the same.
    """
    if isinstance(obj.get("gift"), dict):
        return VoucherType.GIFT_VOUCHER
    if isinstance(obj.get("loyalty_card"), dict):
        return VoucherType.LOYALTY_CARD
    declared = str((obj.get("voucher") or {}).get("type") or "").upper()
    return VoucherType(declared) if declared in CARD_TYPES else None


def is_card(theirs: dict[str, Any]) -> bool:
    """A gift or loyalty card redemption that moved a balance: it has ledger entries."""
    return card_type(theirs) is not None and bool(amount_of(theirs))


def succeeded(obj: dict[str, Any]) -> bool:
    """A rollback (or redemption) that happened: ``result`` SUCCESS / ``status`` SUCCEEDED."""
    result = str(obj.get("result") or "").upper()
    return result == "SUCCESS" or status_of(obj.get("status")) == RedemptionStatus.SUCCEEDED


def is_rollback(obj: dict[str, Any]) -> bool:
    return obj.get("object") == "redemption_rollback"


def rollbacks_newest_first(theirs: dict[str, Any]) -> list[dict[str, Any]]:
    """``related_redemptions.rollbacks`` (``{id, date}``), the newest first."""
    related = theirs.get("related_redemptions") or {}
    rollbacks = [r for r in related.get("rollbacks") or [] if isinstance(r, dict) and r.get("id")]
    return sorted(rollbacks, key=lambda r: str(r.get("date") or ""), reverse=True)


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
        return "Voucherify reports ROLLED_BACK but names no successful rollback"
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


def listed_events(theirs: dict[str, Any], status: str | None, ours: Ours | None) -> list[str]:
    """For a redemption of the listing: the event our records miss (its debit, or it at all).

    Its rollback, if any, is listed at its own date and healed from there.
    """
    if status in DEBITED and (ours is None or (is_card(theirs) and not ours.has_debit)):
        return [SUCCEEDED]
    if status == RedemptionStatus.FAILED and ours is None:
        return [FAILED]
    return []


def listed_disagreement(
    theirs: dict[str, Any], status: str | None, ours: Ours | None
) -> str | None:
    """What a person has to look at for a redemption of the listing; None when it agrees.

    ``ROLLED_BACK`` there with ``SUCCEEDED`` here is no disagreement yet: the rollback is
    listed at its own date, and compared then.
    """
    if status not in STATUSES:
        return f"Voucherify reports an unknown status {theirs.get('status')!r}"
    if ours is None:
        return "our record could not be created from Voucherify's answer (see dead letters)"
    debited_here = ours.status in DEBITED
    # ``result: SUCCESS`` without a ``status`` (the published listing examples) says the
    # redemption succeeded, not that it is not rolled back since: only a ``status`` can.
    explicit = status_of(theirs.get("status")) is not None
    if (status in DEBITED) != debited_here or (
        explicit
        and status == RedemptionStatus.SUCCEEDED
        and ours.status == RedemptionStatus.ROLLED_BACK
    ):
        return f"our record is {ours.status}, Voucherify's is {status}"
    if status in DEBITED and is_card(theirs) and not ours.has_debit:
        return "the debit is missing from the ledger"
    return None


def failed_rollback(obj: dict[str, Any]) -> bool:
    """A rollback attempt Voucherify refused (``result`` FAILURE / ``status`` FAILED)."""
    result = str(obj.get("result") or "").upper()
    return result == "FAILURE" or status_of(obj.get("status")) == RedemptionStatus.FAILED
