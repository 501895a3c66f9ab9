"""The verify job's pure parts: reading Voucherify's answer, comparing, writing the webhook.

No database and no API: ``theirs`` is a plain dict shaped like ``GET /v1/redemptions/<id>``
(``tests/jobs/fake_voucherify.py`` builds them from the published REST examples,
``tests/fixtures/voucherify/api.*.json``), ``Ours`` a plain record.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from devtools.fake_voucherify import api_redemption, api_rollback
from devtools.webhooks import VOUCHERIFY
from schemas.vocabulary import LedgerKind, RedemptionStatus, VoucherType
from workers.jobs.verify import compare, translate
from workers.jobs.verify.compare import (
    FAILED,
    ROLLBACK_SUCCEEDED,
    SUCCEEDED,
    Ours,
    amount_of,
    card_type,
    disagreement,
    is_card,
    listed_disagreement,
    listed_events,
    missing_events,
    rollbacks_newest_first,
    status_from,
    status_of,
    succeeded,
)
from workers.processing import read_delivery
from workers.registry import registry


def published(name: str) -> dict[str, Any]:
    """A published REST example, ``api.<name>.example.json``."""
    return dict(json.loads((VOUCHERIFY / f"api.{name}.example.json").read_text()))


def gift(status: str = "SUCCEEDED", rollback_id: str | None = None) -> dict[str, Any]:
    return api_redemption("gift", "r_1", 2000, status=status, rollback_id=rollback_id)


def ours(
    status: str, has_debit: bool = True, has_restore: bool = False, voucher_id: str = "v_1"
) -> Ours:
    return Ours(status, voucher_id, has_debit, has_restore)


ROLLBACK = {"id": "rr_1", "date": "2024-02-01T10:23:52.499Z"}

# --- reading the answer -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ROLLED_BACK", "ROLLED_BACK"),
        ("ROLLED BACK", "ROLLED_BACK"),  # the webhook schema's spelling
        (" rolled back ", "ROLLED_BACK"),
        ("succeeded", "SUCCEEDED"),
        ("", None),
        (None, None),
    ],
)
def test_status_of_reads_either_spelling(value: Any, expected: str | None) -> None:
    assert status_of(value) == expected


def test_amount_of_reads_the_published_rollbacks() -> None:
    assert amount_of(published("redemption-rollback.response.gift-card")) == -2000
    assert amount_of(published("redemption-rollback.response.loyalty-card")) == -2
    assert amount_of(published("redemption-rollback.response.discount-coupon")) is None


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"amount": 2000, "gift": {"amount": 1}}, 2000),  # ``amount`` first
        ({"amount": None, "gift": {"amount": 1500}}, 1500),
        ({"gift": None, "loyalty_card": {"points": 40}}, 40),
        ({"amount": 0, "loyalty_card": {"points": -40}}, -40),  # zero moves nothing
        ({"amount": True}, None),  # a bool is not an amount
        ({"amount": "2000"}, None),
        ({}, None),
    ],
)
def test_amount_of_falls_back_to_the_card_fields(obj: dict[str, Any], expected: int | None) -> None:
    assert amount_of(obj) == expected


def test_the_card_kind_is_read_from_the_published_answers_gift_and_loyalty_card() -> None:
    # The published GET /v1/redemptions/<id> examples: no voucher.type at all.
    gift_card = published("redemption.get.gift-card")
    loyalty = published("redemption.get.loyalty-card-pay-with-points")
    assert "type" not in gift_card["voucher"]
    assert "type" not in loyalty["voucher"]
    assert card_type(gift_card) == VoucherType.GIFT_VOUCHER
    assert card_type(loyalty) == VoucherType.LOYALTY_CARD
    assert is_card(gift_card)
    assert is_card(loyalty)
    listing = published("redemptions.list")["redemptions"]
    assert [card_type(r) for r in listing].count(None) == 4  # a coupon and 3 failures


def test_a_card_is_a_gift_or_loyalty_voucher_that_moved_an_amount() -> None:
    assert is_card(gift())
    assert is_card(api_redemption("loyalty", "r_2", 50))
    assert not is_card(api_redemption("gift", "r_3", 0))
    assert not is_card(published("redemption-rollback.response.discount-coupon"))
    assert not is_card(published("redemption-rollback.response.promotion-tier"))  # no voucher
    declared = {"amount": 5, "voucher": {"type": "gift_voucher"}}  # a voucher.type, if given
    assert is_card(declared)


def test_a_status_missing_from_the_answer_is_read_from_its_result() -> None:
    assert status_from(published("redemption.get.gift-card")) == "SUCCEEDED"
    assert status_from({"result": "FAILURE"}) == "FAILED"
    assert status_from({"result": "SUCCESS", "status": "ROLLED_BACK"}) == "ROLLED_BACK"
    assert status_from({}) is None


def test_a_rollback_counts_by_its_result() -> None:
    assert succeeded(published("redemption-rollback.response.gift-card"))
    assert succeeded({"status": "SUCCEEDED"})
    assert not succeeded({"result": "FAILURE", "status": "FAILED"})
    assert not succeeded({})


def test_the_rollbacks_are_tried_newest_first() -> None:
    theirs = gift("ROLLED_BACK", rollback_id="rr_1")
    assert rollbacks_newest_first(theirs) == [{"id": "rr_1", "date": "2024-02-01T10:23:52.499Z"}]
    theirs["related_redemptions"]["rollbacks"] = [
        {"id": "rr_old", "date": "2024-02-01T10:00:00.000Z"},
        {"id": "rr_new", "date": "2024-02-02T10:00:00.000Z"},
        {"date": "2024-03-01T10:00:00.000Z"},  # no id: nothing to ask for
        "rr_not_an_object",
    ]
    assert [r["id"] for r in rollbacks_newest_first(theirs)] == ["rr_new", "rr_old"]
    assert rollbacks_newest_first(gift()) == []
    assert rollbacks_newest_first({"id": "r_1"}) == []


@pytest.mark.parametrize(
    ("status", "record", "events", "problem"),
    [
        ("SUCCEEDED", None, [SUCCEEDED], "could not be created"),
        ("SUCCEEDED", ours("SUCCEEDED"), [], None),
        ("SUCCEEDED", ours("SUCCEEDED", has_debit=False), [SUCCEEDED], "debit is missing"),
        ("ROLLED_BACK", ours("SUCCEEDED"), [], None),  # its rollback is listed at its date
        ("ROLLED_BACK", ours("ROLLED_BACK", has_restore=True), [], None),
        ("SUCCEEDED", ours("ROLLED_BACK"), [], "our record is ROLLED_BACK"),
        ("FAILED", None, [FAILED], "could not be created"),
        ("FAILED", ours("FAILED", has_debit=False), [], None),
        ("FAILED", ours("SUCCEEDED"), [], "our record is SUCCEEDED, Voucherify's is FAILED"),
    ],
)
def test_a_listed_redemption_is_compared_on_its_own_debit(
    status: str, record: Ours | None, events: list[str], problem: str | None
) -> None:
    assert listed_events(gift(), status, record) == events
    found = listed_disagreement(gift(), status, record)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found


# --- which events are missing -----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "rollback", "record", "expected"),
    [
        ("SUCCEEDED", None, None, [SUCCEEDED]),
        ("SUCCEEDED", None, ours("SUCCEEDED"), []),
        ("SUCCEEDED", None, ours("SUCCEEDED", has_debit=False), [SUCCEEDED]),
        ("ROLLED_BACK", ROLLBACK, None, [SUCCEEDED, ROLLBACK_SUCCEEDED]),
        ("ROLLED_BACK", ROLLBACK, ours("SUCCEEDED"), [ROLLBACK_SUCCEEDED]),
        ("ROLLED_BACK", ROLLBACK, ours("ROLLED_BACK"), [ROLLBACK_SUCCEEDED]),  # no restore
        ("ROLLED_BACK", ROLLBACK, ours("ROLLED_BACK", has_restore=True), []),
        ("ROLLED_BACK", None, None, [SUCCEEDED]),  # no rollback named: nothing to restore
        ("FAILED", None, None, [FAILED]),
        ("FAILED", None, ours("FAILED", has_debit=False), []),
        ("UNKNOWN", None, None, []),
        (None, None, None, []),
    ],
)
def test_missing_events_of_a_card_redemption(
    status: str | None,
    rollback: dict[str, Any] | None,
    record: Ours | None,
    expected: list[str],
) -> None:
    assert missing_events(gift(), status, rollback, record) == expected


def test_without_a_card_the_ledger_is_not_asked_for() -> None:
    coupon = published("redemption-rollback.response.discount-coupon")
    no_entries = ours("SUCCEEDED", has_debit=False)
    assert missing_events(coupon, "SUCCEEDED", None, no_entries) == []
    rolled_back = ours("ROLLED_BACK", has_debit=False)
    assert missing_events(coupon, "ROLLED_BACK", ROLLBACK, rolled_back) == []
    assert missing_events(coupon, "ROLLED_BACK", ROLLBACK, no_entries) == [ROLLBACK_SUCCEEDED]


# --- what still disagrees ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "rollback", "record", "problem"),
    [
        ("SUCCEEDED", None, ours("SUCCEEDED"), None),
        ("ROLLED_BACK", ROLLBACK, ours("ROLLED_BACK", has_restore=True), None),
        ("FAILED", None, ours("FAILED", has_debit=False), None),
        ("EXPIRED", None, ours("SUCCEEDED"), "Voucherify reports an unknown status"),
        (None, None, ours("SUCCEEDED"), "Voucherify reports an unknown status"),
        ("ROLLED_BACK", None, ours("ROLLED_BACK"), "names no successful rollback"),
        ("SUCCEEDED", None, None, "our record could not be created"),
        ("SUCCEEDED", None, ours("ROLLED_BACK"), "our record is ROLLED_BACK, Voucherify's is"),
        ("SUCCEEDED", None, ours("SUCCEEDED", has_debit=False), "the debit is missing"),
        ("ROLLED_BACK", ROLLBACK, ours("ROLLED_BACK", has_debit=False), "the debit is missing"),
        ("ROLLED_BACK", ROLLBACK, ours("ROLLED_BACK"), "the restore is missing"),
    ],
)
def test_disagreement_of_a_card_redemption(
    status: str | None,
    rollback: dict[str, Any] | None,
    record: Ours | None,
    problem: str | None,
) -> None:
    theirs = gift()
    if status is not None:
        theirs["status"] = status
    found = disagreement(theirs, status, rollback, record)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found


def test_the_unknown_status_is_quoted_as_voucherify_wrote_it() -> None:
    theirs = {**gift(), "status": "expired"}
    assert disagreement(theirs, "EXPIRED", None, ours("SUCCEEDED")) == (
        "Voucherify reports an unknown status 'expired'"
    )


def test_without_a_card_a_missing_restore_is_no_disagreement() -> None:
    coupon = published("redemption-rollback.response.discount-coupon")
    assert disagreement(coupon, "ROLLED_BACK", ROLLBACK, ours("ROLLED_BACK", False, False)) is None


# --- the webhook it would have sent -----------------------------------------------------


def test_the_snapshot_is_the_redemption_object_of_a_webhook() -> None:
    theirs = gift()
    snap = translate.snapshot(theirs)
    assert snap["id"] == "r_1"
    assert snap["object"] == "redemption"
    assert (snap["status"], snap["date"], snap["amount"]) == ("SUCCEEDED", theirs["date"], 2000)
    assert snap["order"] == {"id": "ord_card_test"}  # a reference, not the order
    assert snap["voucher"] == {**theirs["voucher"], "type": "GIFT_VOUCHER"}  # from ``gift``
    assert snap["customer_id"] == "cust_card_test"


def test_succeeded_data_carries_no_top_level_voucher() -> None:
    theirs = gift()
    data = translate.succeeded_data(theirs)
    assert data["voucher"] is None  # its balance is a snapshot of unknown time
    assert data["customer"] == {"id": "cust_card_test"}
    assert data["order"] == theirs["order"]
    assert data["redemption"] == translate.snapshot(theirs)


def test_customer_and_order_are_read_where_voucherify_puts_them() -> None:
    assert translate.customer_of({"customer": {"id": "cust_1", "object": "customer"}}) == {
        "id": "cust_1"
    }
    assert translate.customer_of({"customer": None, "customer_id": "cust_2"}) == {"id": "cust_2"}
    assert translate.customer_of({"customer": "cust_3"}) is None
    assert translate.customer_of({}) is None
    rollback = published("redemption-rollback.response.gift-card")
    assert translate.customer_of(rollback) == {"id": "cust_eWgXlBBiY6THFRJwX45Iakv4"}
    assert translate.order_of(rollback) == rollback["order"]
    assert translate.order_of({"order": {"id": None}}) is None
    assert translate.order_of({"order": "ord_1"}) is None


def test_rollback_data_from_the_published_gift_card_rollback() -> None:
    theirs = gift("ROLLED_BACK", rollback_id="rr_0c5eb099214ccea115")
    rollback = published("redemption-rollback.response.gift-card")

    data = translate.rollback_data(theirs, rollback)

    restored = data["redemption_rollback"]
    assert restored["id"] == "rr_0c5eb099214ccea115"
    assert restored["object"] == "redemption_rollback"
    assert restored["status"] == "SUCCEEDED"
    assert restored["amount"] == -2000
    assert restored["redemption"] == "r_1"
    assert restored["date"] == "2023-01-27T15:22:37.573Z"
    assert restored["customer_id"] == "cust_eWgXlBBiY6THFRJwX45Iakv4"
    assert restored["order"] == {"id": "ord_S4BvUj64TlGqVZDOeud7z3rU"}
    assert data["order"] == rollback["order"]  # the rollback's order: it is the newer
    assert data["redemption"] == translate.snapshot(theirs)
    assert data["voucher"] is None


def test_rollback_data_of_a_bare_rollback_reference() -> None:
    theirs = gift("ROLLED_BACK", rollback_id="rr_1")

    data = translate.rollback_data(theirs, {**ROLLBACK, "amount": 2000})

    restored = data["redemption_rollback"]
    assert restored["amount"] == -2000  # a rollback gives back: negative, whatever the sign
    assert restored["customer_id"] == "cust_card_test"  # from the redemption
    assert restored["order"] == {"id": "ord_card_test"}
    assert data["order"] == theirs["order"]
    assert translate.rollback_data(theirs, ROLLBACK)["redemption_rollback"]["amount"] is None


def test_each_missing_event_gets_its_data_and_date() -> None:
    theirs = gift("ROLLED_BACK", rollback_id="rr_1")
    data, at = translate.event_data(SUCCEEDED, theirs, ROLLBACK)
    assert (data, at) == (translate.succeeded_data(theirs), theirs["date"])
    data, at = translate.event_data(ROLLBACK_SUCCEEDED, theirs, ROLLBACK)
    assert (data, at) == (translate.rollback_data(theirs, ROLLBACK), ROLLBACK["date"])
    _, at = translate.event_data(ROLLBACK_SUCCEEDED, theirs, {"id": "rr_1"})
    assert at == theirs["date"]  # the rollback's date unknown: the redemption's
    failed = {**gift(), "status": "FAILED"}
    assert translate.event_data(FAILED, failed, None) == (
        translate.succeeded_data(failed),
        failed["date"],
    )


def test_one_synthetic_event_id_per_redemption_and_status() -> None:
    assert translate.event_id("r_1", SUCCEEDED) == "verify:r_1:SUCCEEDED"
    assert translate.event_id("r_1", ROLLBACK_SUCCEEDED) == "verify:r_1:ROLLED_BACK"
    assert translate.event_id("r_1", FAILED) == "verify:r_1:FAILED"
    assert set(compare.EVENT_STATUS.values()) == set(RedemptionStatus)


def loaded_webhook(
    redemption_id: str, status: str, theirs: dict[str, Any], rollback: dict[str, Any] | None
) -> Any:
    """The webhook the job writes for ``status``, read as a real delivery is read and
    loaded by its route's schemas: the event the handler would get."""
    event_id = translate.event_id(redemption_id, status)
    data, at = translate.event_data(status, theirs, rollback)
    assert at is not None
    body = translate.webhook_body(event_id, status, data, at)

    delivery = read_delivery(body, "verify-test", at)
    assert delivery.envelope is not None
    assert (delivery.event_id, delivery.type) == (event_id, status)
    route = registry.route(status)
    assert route is not None
    return route.load(event_id, status, at, delivery.envelope.data)


def test_the_webhook_loads_through_the_handlers_schemas() -> None:
    """What the job writes, the schemas of a real delivery read: a rollback of 2000 credits."""
    theirs = api_redemption("gift", "r_1", 2000, status="ROLLED_BACK", rollback_id="rr_1")
    rollback = api_rollback("gift", "rr_1", "r_1", 2000)

    event = loaded_webhook("r_1", ROLLBACK_SUCCEEDED, theirs, rollback)

    assert event.redemption.id == "r_1"
    assert event.rollback.id == "rr_1"
    assert event.rollback.amount == -2000
    assert event.customer_id == "cust_card_test"
    assert event.card is not None
    assert event.card.ledger_kind == LedgerKind.GIFT_CREDIT
    assert event.voucher is None  # the balance is not taken from the API


def test_a_succeeded_webhook_loads_with_its_debit() -> None:
    event = loaded_webhook("r_2", SUCCEEDED, api_redemption("loyalty", "r_2", 50), None)

    assert (event.redemption.id, event.redemption.amount) == ("r_2", 50)
    assert event.card is not None
    assert event.card.ledger_kind == LedgerKind.LOYALTY_POINTS
    assert event.order is not None
    assert event.order.id == "ord_card_test"
