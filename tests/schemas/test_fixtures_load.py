"""Every published payload loads, or is recognised as a type we do not handle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from marshmallow import ValidationError

from devtools.webhooks import REDEMPTION_FAMILY, SEEDS, VOUCHERIFY, fixture
from schemas.envelope import LEGACY_FORMAT, read_envelope
from schemas.redemption import load_redemption_event
from workers.handlers.cards import CARD_MOVEMENT_TYPES
from workers.handlers.orders import ORDER_EVENT_TYPES
from workers.processing import read_delivery
from workers.registry import registry

WEBHOOK_DATA_FILES = sorted(
    p
    for p in VOUCHERIFY.glob("*.example.json")
    if not p.name.startswith(("api.", "envelope.", "legacy-"))
)


def _event_type(path: Path) -> str:
    return path.name.removesuffix(".example.json")


@pytest.mark.parametrize("event_type", REDEMPTION_FAMILY)
def test_redemption_family_fixture_loads(event_type: str) -> None:
    event = load_redemption_event(
        "ev_1",
        event_type,
        "2024-01-01T11:11:11.111Z",
        fixture(event_type),
        "rollback" in event_type,
    )
    assert event.redemption.id.startswith("r")
    assert event.customer_id is not None
    if "rollback" in event_type:
        assert event.rollback is not None
        assert event.rollback.id.startswith("rr")


@pytest.mark.parametrize("path", WEBHOOK_DATA_FILES, ids=_event_type)
def test_every_webhook_fixture_has_a_route_or_is_recognised_as_unhandled(path: Path) -> None:
    event_type = _event_type(path)
    route = registry.route(event_type)
    if event_type in (*REDEMPTION_FAMILY, *CARD_MOVEMENT_TYPES, *ORDER_EVENT_TYPES):
        assert route is not None
        route.load("ev_1", event_type, None, json.loads(path.read_text()))
    else:
        assert route is None  # stored and marked ignored by the worker


def test_rolled_back_status_is_accepted_with_underscore_and_with_space() -> None:
    data = fixture("redemption.rollback.failed")
    assert data["redemption"]["status"] == "ROLLED_BACK"
    spaced = json.loads(json.dumps(data).replace('"ROLLED_BACK"', '"ROLLED BACK"'))
    for payload in (data, spaced):
        event = load_redemption_event("ev", "redemption.rollback.failed", None, payload, True)
        assert event.redemption.status == "ROLLED_BACK"


def test_unknown_fields_are_excluded_and_a_wrong_type_is_a_validation_error() -> None:
    data = fixture("redemption.succeeded")
    data["brand_new_field"] = {"anything": 1}
    load_redemption_event("ev", "redemption.succeeded", None, data, False)
    data["redemption"]["amount"] = "twenty"
    with pytest.raises(ValidationError) as info:
        load_redemption_event("ev", "redemption.succeeded", None, data, False)
    assert "amount" in json.dumps(info.value.messages)


def test_rollback_event_without_its_rollback_is_invalid() -> None:
    data = fixture("redemption.rollback.succeeded")
    data["redemption_rollback"] = None
    with pytest.raises(ValidationError):
        load_redemption_event("ev", "redemption.rollback.succeeded", None, data, True)


def test_distribution_envelope_routes_on_event_type_not_on_the_user_chosen_name() -> None:
    body = json.loads(
        (
            VOUCHERIFY / "envelope.distribution.customer.redemption.succeeded.example.json"
        ).read_text()
    )
    envelope = read_envelope(body)
    assert body["type"] == "Voucher-redeemed"
    assert envelope.type == "customer.redemption.succeeded"
    assert envelope.event_id == "evcus_115d38459e5318ae94"
    route = registry.route(envelope.type)
    assert route is not None
    route.load(envelope.event_id, envelope.type, envelope.event_created_at, envelope.data)


@pytest.mark.parametrize(
    "name",
    ["envelope.project-settings.voucher.published", "envelope.distribution.sample-output"],
)
def test_other_full_envelopes_are_recognised_as_unhandled_types(name: str) -> None:
    body = json.loads((VOUCHERIFY / f"{name}.example.json").read_text())
    envelope = read_envelope(body)
    assert envelope.event_id
    assert envelope.type
    assert registry.route(envelope.type) is None


def test_legacy_format_is_recognised() -> None:
    body = (VOUCHERIFY / "legacy-v2018-08-01.redemption.succeeded.example.json").read_text()
    delivery = read_delivery(body, "d1", "2024-01-01T00:00:00+00:00")
    assert delivery.envelope is not None
    assert delivery.envelope.format == LEGACY_FORMAT


@pytest.mark.parametrize("path", sorted(SEEDS.glob("*.json")), ids=lambda p: p.name)
def test_seed_payloads_load_or_are_recognised(path: Path) -> None:
    name = path.name.split(".", 1)[1].removesuffix(".json")
    data = json.loads(path.read_text())
    if name.startswith("api."):
        # REST request/response bodies, not webhooks: documented input for the
        # reconciliation client; nothing routes them.
        assert registry.route(name) is None
        return
    route = registry.route(name)
    assert route is not None
    event = route.load("ev_seed", name, None, data)
    assert event.redemption.id
