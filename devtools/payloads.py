"""Hypothesis strategies for Voucherify webhooks, generated from Voucherify's published schemas.

``webhook_data(type)`` draws ``data`` of an event type from its schema in
``tests/fixtures/voucherify-openapi/OpenAPIWebhooks.json``
(``webhooks/<EVENT>/post/requestBody/content/application/json/schema``, refs into
``components/schemas``); ``webhook_envelope(type)`` wraps it in the v2024-01-01 envelope.

The schemas become strategies through ``devtools.schema_strategies``.

Almost nothing is required, so for the redemption family the generator adds what every real
event carries: ``data.redemption`` with a non-empty ``id``, and for the rollback types
``data.redemption_rollback`` with its ``id`` too.
"""

from __future__ import annotations

import functools
import json
import string
import uuid
from typing import Any

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from devtools.schema_strategies import DATE_TIMES, REF, Schema, Translator
from devtools.webhooks import FIXTURES, REDEMPTION_FAMILY

DOCUMENT = FIXTURES / "voucherify-openapi" / "OpenAPIWebhooks.json"
TARGET_URL = "https://example.test/webhooks/voucherify"


# The document's names that are not the upper-cased event type (VOUCHERIFY.md section 1).
_DOCUMENT_NAMES = {
    "manual_distribution_schedule": "EVENTS.DISTRIBUTION.MANUAL_DISTRIBUTION_SCHEDULE",
}
_DOCUMENT_PREFIXES = {"business_validation_rule.": "bus_val_rule."}
# Types sent by Distribution webhooks: top-level ``type`` is the user's free text there.
_CUSTOMER_SCOPED = ("redemption.", "order.", "voucher.", "loyalty.", "segment.", "publication.")
_DISTRIBUTED = (*(f"customer.{kind}" for kind in _CUSTOMER_SCOPED), "customer.custom_event")
_DISTRIBUTED += ("manual_distribution_schedule",)
_EVENT_ID_PREFIXES = {"redemption": "evred_", "customer": "evcus_", "voucher": "evvou_"}


@functools.cache
def _document() -> Schema:
    document: Schema = json.loads(DOCUMENT.read_text(encoding="utf-8"))
    return document


def document_name(event_type: str) -> str:
    """``redemption.succeeded`` -> ``EVENTS.REDEMPTION.SUCCEEDED``, the key in ``webhooks``."""
    name = _DOCUMENT_NAMES.get(event_type)
    if name is None:
        dotted = event_type
        for wire, documented in _DOCUMENT_PREFIXES.items():
            if dotted.startswith(wire):
                dotted = documented + dotted.removeprefix(wire)
        name = f"EVENTS.{dotted.upper()}"
    if name not in _document()["webhooks"]:
        raise KeyError(f"{event_type!r}: no webhook {name!r} in {DOCUMENT.name}")
    return name


def data_schema(event_type: str) -> Schema:
    """The published schema of ``data`` of ``event_type`` (refs not resolved)."""
    webhook = _document()["webhooks"][document_name(event_type)]
    schema: Schema = webhook["post"]["requestBody"]["content"]["application/json"]["schema"]
    return schema


def carried_fields(event_type: str) -> tuple[str, ...]:
    """The objects of ``data`` every real event of the type carries, each with its ``id``."""
    if event_type.startswith("customer.order."):
        return ("order",)
    if event_type not in REDEMPTION_FAMILY:
        return ()
    return ("redemption", "redemption_rollback") if "rollback" in event_type else ("redemption",)


def _carried(event_type: str) -> Schema:
    with_id = {
        "type": "object",
        "required": ["id"],
        "properties": {"id": {"type": "string", "minLength": 1}},
    }
    fields = carried_fields(event_type)
    return {"required": list(fields), "properties": dict.fromkeys(fields, with_id)}


# --- scalar strategies ---------------------------------------------------------------


@functools.cache
def _translator(surrogates: bool) -> Translator:
    return Translator(_document()["components"]["schemas"], surrogates)


# --- the public strategies -----------------------------------------------------------


@functools.cache
def webhook_data(event_type: str, *, surrogates: bool = False) -> SearchStrategy[dict[str, Any]]:
    """``data`` of ``event_type`` as its published schema allows, carrying its ids.

    ``surrogates=True`` lets strings carry lone surrogates (``json.dumps`` escapes them as
    ``\\udXXX``; they are not valid UTF-8 and no real sender produces them).
    """
    schema = {"allOf": [data_schema(event_type), _carried(event_type)]}
    strategy: SearchStrategy[dict[str, Any]] = _translator(surrogates).strategy(schema)
    return strategy


def webhook_envelope(
    event_type: str, *, surrogates: bool = False
) -> SearchStrategy[dict[str, Any]]:
    """The v2024-01-01 envelope Voucherify POSTs for ``event_type`` (VOUCHERIFY.md section 1).

    Project-settings webhooks put the event type at the top level; Distribution webhooks
    (``customer.redemption.*`` and the other customer-scoped types) put the user's free
    text there and the type only in ``event.type``. The envelope ``id`` and ``event.id`` are
    random (uuid4), so no two examples share them, within a run or across runs.
    """
    return _envelope(event_type, surrogates)


def is_distributed(event_type: str) -> bool:
    """Whether Voucherify sends ``event_type`` from a Distribution, not Project settings."""
    return event_type.startswith(_DISTRIBUTED)


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:18]}"


_ID_TAILS = st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=24)


def _ids(prefix: str) -> SearchStrategy[str]:
    return _ID_TAILS.map(lambda tail: prefix + tail)


def _entity_id(event_type: str, data: dict[str, Any]) -> str | None:
    """The id of the object the event is about (an inference: the docs show ``r_…``/``cust_…``)."""
    holder = "customer" if is_distributed(event_type) else None
    for name in (holder, *reversed(carried_fields(event_type))):
        value = data.get(name) if name else None
        if isinstance(value, dict) and isinstance(value.get("id"), str) and value["id"]:
            return str(value["id"])
    return None


@st.composite
def _envelope(draw: st.DrawFn, event_type: str, surrogates: bool) -> dict[str, Any]:
    translator = _translator(surrogates)
    data = draw(webhook_data(event_type, surrogates=surrogates))
    distributed = is_distributed(event_type)
    created_at = draw(DATE_TIMES)
    family = event_type.partition(".")[0]
    return {
        "id": _unique("whs_"),
        "project_id": draw(_ids("proj_")),
        "created_at": created_at,
        "type": draw(translator.text) if distributed else event_type,
        "data": data,
        "source": {
            "id": draw(_ids("distr_" if distributed else "wh_")),
            "object": "distribution" if distributed else "webhook",
            "target_url": TARGET_URL,
        },
        "event": {
            "id": _unique(_EVENT_ID_PREFIXES.get(family, "ev_")),
            "type": event_type,
            "created_at": created_at,
            "entity_id": _entity_id(event_type, data) or draw(_ids("ent_")),
            "group_id": draw(_ids("v-")),
            "event_source": draw(translator.strategy({"$ref": f"{REF}EventSource"})),
        },
    }
