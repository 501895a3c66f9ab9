"""Hypothesis strategies for Voucherify webhooks, generated from Voucherify's published schemas.

``webhook_data(type)`` draws ``data`` of an event type from its schema in
``tests/fixtures/voucherify-openapi/OpenAPIWebhooks.json``
(``webhooks/<EVENT>/post/requestBody/content/application/json/schema``, refs into
``components/schemas``); ``webhook_envelope(type)`` wraps it in the v2024-01-01 envelope.

Why our own translator, not ``hypothesis-jsonschema``: its latest release, 0.23.1, installs
beside hypothesis 6.170 (it asks for hypothesis >= 6.84.3), but there ``from_schema`` fails
on every object schema (``AttributeError: 'many' object has no attribute 'more'``: it uses
hypothesis internals that have changed). It works with hypothesis 6.103.5 (its README says
< 6.104), and we will not hold the project's hypothesis back for it; even there, 200
``redemption.succeeded`` examples took 83 s and only 17 carried a ``redemption.id``.

It covers the JSON-Schema subset the document uses (counts over ``components/schemas``: type
1564, $ref 566, properties 412, required 239, enum 200, nullable 195, allOf 143, format 117
(date-time 109, date 6, time 2), items 47, oneOf 23, additionalProperties 15, minimum 8,
maxItems 5, maximum 4, pattern 2, minItems, maxProperties and min 1 each), plus anyOf,
const, minLength/maxLength and type lists. Its readings:

- ``nullable: true`` (OpenAPI 3.0 in a 3.1 document) adds a null alternative; an ``allOf``
  admits null when each member does (a member without a type of its own does).
- ``allOf`` and a ``$ref`` with siblings are merged into one schema; ``oneOf``/``anyOf``
  pick one branch (exclusivity is not enforced).
- Objects: required properties always, optional ones sometimes; unless
  ``additionalProperties: false``, extra fields sometimes (any JSON, or the given schema).
- Strings: any text a JSON string carries, ``\x00`` included; lone surrogates only with
  ``surrogates=True``. ``date-time``/``date``/``time``: RFC 3339 (upper-case ``T`` and ``Z``,
  0-6 fraction digits, offsets in whole minutes, no leap second); ``pattern``: ``from_regex``.
- Integers are 64-bit; numbers are finite, integral ones written as a JavaScript sender does.
- Ignored: annotations (description, title, example, default), ``maxProperties`` and
  ``min`` (a typo for ``minimum``), each used once and not in the redemption family.

Almost nothing is required, so for the redemption family the generator adds what every real
event carries: ``data.redemption`` with a non-empty ``id``, and for the rollback types
``data.redemption_rollback`` with its ``id`` too.
"""

from __future__ import annotations

import functools
import json
import string
import uuid
from datetime import datetime, time
from typing import Any

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from devtools.webhooks import FIXTURES, REDEMPTION_FAMILY

DOCUMENT = FIXTURES / "voucherify-openapi" / "OpenAPIWebhooks.json"
REF = "#/components/schemas/"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_ITEMS = 3
MAX_EXTRA_FIELDS = 3
TARGET_URL = "https://example.test/webhooks/voucherify"

Schema = dict[str, Any]

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
_LOWER_BOUNDS = ("minimum", "minItems", "minLength")
_UPPER_BOUNDS = ("maximum", "maxItems", "maxLength")


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


def _alphabet(surrogates: bool) -> SearchStrategy[str]:
    if not surrogates:
        return st.characters(codec="utf-8")  # every code point but surrogates; "\x00" too
    # Lone surrogates are 2,048 of 1.1 million code points: ask for them on purpose.
    return st.characters() | st.characters(categories=["Cs"])


def _fraction(moment: datetime | time, digits: int) -> str:
    return f".{moment.microsecond:06d}"[: digits + 1] if digits else ""


def _offset(minutes: int, zulu: bool) -> str:
    if minutes == 0 and zulu:
        return "Z"
    sign = "-" if minutes < 0 else "+"
    hours, rest = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{rest:02d}"


def _rfc3339(moment: datetime | time, digits: int, minutes: int, zulu: bool) -> str:
    """``date-time`` (from a datetime) or ``full-time`` (from a time) of RFC 3339."""
    whole = moment.replace(microsecond=0).isoformat()
    return whole + _fraction(moment, digits) + _offset(minutes, zulu)


_DIGITS = st.integers(min_value=0, max_value=6)
_OFFSETS = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1)
# A day off either end, so that no offset carries the instant out of datetime's range.
DATE_TIMES = st.builds(
    _rfc3339,
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    _DIGITS,
    _OFFSETS,
    st.booleans(),
)
"""RFC 3339 ``date-time`` strings, with ``Z`` or a numeric offset."""
_FORMATS: dict[str, SearchStrategy[str]] = {
    "date-time": DATE_TIMES,
    "date": st.dates().map(lambda day: day.isoformat()),
    "time": st.builds(_rfc3339, st.times(), _DIGITS, _OFFSETS, st.booleans()),
}


def _as_sent(number: float) -> int | float:
    """A JavaScript sender writes an integral number without a fraction: 1000, not 1000.0."""
    return int(number) if number.is_integer() and abs(number) < 1e21 else number


def _types(schema: Schema) -> list[str]:
    kind = schema.get("type")
    if kind is None:
        return []
    return [kind] if isinstance(kind, str) else list(kind)


# --- the translator ------------------------------------------------------------------


class _Translator:
    """Schema -> strategy over one document's ``components/schemas``."""

    def __init__(self, components: Schema, surrogates: bool) -> None:
        self._components = components
        self._refs: dict[str, SearchStrategy[Any]] = {}
        self._alphabet = _alphabet(surrogates)
        self.text = st.text(alphabet=self._alphabet)
        scalars = (
            st.none()
            | st.booleans()
            | st.integers(min_value=INT64_MIN, max_value=INT64_MAX)
            | st.floats(allow_nan=False, allow_infinity=False).map(_as_sent)
            | self.text
        )
        self.json: SearchStrategy[Any] = st.recursive(
            scalars,
            lambda inner: (
                st.lists(inner, max_size=MAX_ITEMS)
                | st.dictionaries(self.text, inner, max_size=MAX_ITEMS)
            ),
            max_leaves=8,
        )

    def strategy(self, schema: Schema | bool) -> SearchStrategy[Any]:
        if isinstance(schema, bool):
            return self.json if schema else st.nothing()
        if schema.get("nullable") is True:
            rest = {k: v for k, v in schema.items() if k != "nullable"}
            return st.none() | self.strategy(rest)
        if "$ref" in schema and "allOf" not in schema and not self._constrains(schema):
            return self._ref(schema["$ref"])
        if "$ref" in schema or "allOf" in schema:
            return self.strategy(self.merge(schema))
        for key in ("oneOf", "anyOf"):
            if key in schema:
                base = {k: v for k, v in schema.items() if k != key}
                branches = [self.strategy({"allOf": [base, branch]}) for branch in schema[key]]
                return st.one_of(branches)
        if "const" in schema:
            return st.just(schema["const"])
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        types = _types(schema) or (["object"] if "properties" in schema else [])
        if not types:
            return self.json
        return st.one_of([self._typed(kind, schema) for kind in types])

    @staticmethod
    def _constrains(schema: Schema) -> bool:
        """Whether ``schema`` says more than its ``$ref`` (annotations aside)."""
        annotations = {"$ref", "description", "title", "example", "examples", "default"}
        return bool(set(schema) - annotations)

    def _target(self, ref: str) -> Schema:
        if not ref.startswith(REF):
            raise ValueError(f"only refs into {REF} are supported, not {ref!r}")
        target: Schema = self._components[ref.removeprefix(REF)]
        return target

    def _ref(self, ref: str) -> SearchStrategy[Any]:
        if ref not in self._refs:  # deferred: a schema may refer to itself
            self._refs[ref] = st.deferred(lambda: self.strategy(self._target(ref)))
        return self._refs[ref]

    def admits_null(self, schema: Schema | bool) -> bool:
        """Null is valid: ``nullable``, a ``null`` type, or no type and members that admit it."""
        if isinstance(schema, bool):
            return schema
        if schema.get("nullable") is True or "null" in _types(schema):
            return True
        if "type" in schema or "enum" in schema or "const" in schema:
            return "enum" in schema and None in schema["enum"]
        members = [self._target(schema["$ref"])] if "$ref" in schema else []
        return all(self.admits_null(member) for member in [*members, *schema.get("allOf", ())])

    def _parts(self, schema: Schema | bool) -> list[Schema]:
        """``schema`` and the schemas its ``$ref`` and ``allOf`` name, flattened."""
        if isinstance(schema, bool):
            return [] if schema else [{"not": {}}]
        skip = {"$ref", "allOf", "nullable"}
        parts = [{k: v for k, v in schema.items() if k not in skip}]
        if "$ref" in schema:
            parts += self._parts(self._target(schema["$ref"]))
        for member in schema.get("allOf", ()):
            parts += self._parts(member)
        return parts

    def merge(self, schema: Schema) -> Schema:
        """One schema equal to ``schema`` with its ``$ref`` and ``allOf`` folded in."""
        merged: Schema = {}
        for part in self._parts(schema):
            for key, value in part.items():
                if key == "properties":
                    properties = merged.setdefault("properties", {})
                    for name, sub in value.items():
                        known = properties.get(name)
                        properties[name] = sub if known is None else {"allOf": [known, sub]}
                elif key == "required":
                    merged[key] = list(dict.fromkeys([*merged.get(key, []), *value]))
                elif key == "enum" and key in merged:
                    merged[key] = [v for v in merged[key] if v in value]
                elif key == "not" or (key in ("oneOf", "anyOf") and key in merged):
                    raise ValueError(f"allOf with {key} in two members is not supported")
                elif key in _LOWER_BOUNDS and key in merged:
                    merged[key] = max(merged[key], value)
                elif key in _UPPER_BOUNDS and key in merged:
                    merged[key] = min(merged[key], value)
                else:
                    merged.setdefault(key, value)
        if self.admits_null({k: v for k, v in schema.items() if k != "nullable"}):
            merged["nullable"] = True
        return merged

    def _typed(self, kind: str, schema: Schema) -> SearchStrategy[Any]:
        if kind == "object":
            return self._object(schema)
        if kind == "array":
            least = schema.get("minItems", 0)
            most = schema.get("maxItems", max(least, MAX_ITEMS))
            return st.lists(self.strategy(schema.get("items", True)), min_size=least, max_size=most)
        if kind == "string":
            if schema.get("format") in _FORMATS:
                return _FORMATS[schema["format"]]
            if "pattern" in schema:
                return st.from_regex(schema["pattern"])  # a search, as in JSON Schema
            least, most = schema.get("minLength", 0), schema.get("maxLength")
            return st.text(alphabet=self._alphabet, min_size=least, max_size=most)
        if kind == "integer":
            low = max(schema.get("minimum", INT64_MIN), INT64_MIN)
            high = min(schema.get("maximum", INT64_MAX), INT64_MAX)
            return st.integers(min_value=low, max_value=high)
        if kind == "number":
            low, high = schema.get("minimum"), schema.get("maximum")
            floats = st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False)
            return floats.map(_as_sent)
        if kind == "boolean":
            return st.booleans()
        if kind == "null":
            return st.none()
        raise ValueError(f"unsupported type {kind!r}")

    def _object(self, schema: Schema) -> SearchStrategy[dict[str, Any]]:
        extra: Schema | bool = schema.get("additionalProperties", True)
        fields = {name: self.strategy(sub) for name, sub in schema.get("properties", {}).items()}
        required = list(schema.get("required", ()))
        for name in required:  # required but never declared: the extra fields' schema
            fields.setdefault(name, self.strategy(extra))
        declared = st.fixed_dictionaries(
            {name: fields[name] for name in required},
            optional={name: s for name, s in fields.items() if name not in required},
        )
        if extra is False:
            return declared
        names = self.text.filter(lambda name: name not in fields)
        extras = st.dictionaries(names, self.strategy(extra), max_size=MAX_EXTRA_FIELDS)
        return st.builds(lambda own, more: {**own, **more}, declared, extras)


@functools.cache
def _translator(surrogates: bool) -> _Translator:
    return _Translator(_document()["components"]["schemas"], surrogates)


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
