"""JSON Schema to hypothesis strategies, for the subset Voucherify's OpenAPI documents use.

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
- Integers are 64-bit and symmetric (from -(2**63 - 1)): a movement's amount must have
  a negation (a restore mirrors its debit), and -2**63 has none in PostgreSQL's bigint.
  That one value is a dead letter with its reason (SQLSTATE 22003), as hostile input is.
  Numbers are finite, integral ones written as a JavaScript sender does.
- Ignored: annotations (description, title, example, default), ``maxProperties`` and
  ``min`` (a typo for ``minimum``), each used once and not in the redemption family.
"""

from __future__ import annotations

from datetime import datetime, time
from typing import Any

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

REF = "#/components/schemas/"
MAX_ITEMS = 3
MAX_EXTRA_FIELDS = 3
INT64_MIN, INT64_MAX = -(2**63 - 1), 2**63 - 1
_LOWER_BOUNDS = ("minimum", "minItems", "minLength")
_UPPER_BOUNDS = ("maximum", "maxItems", "maxLength")

Schema = dict[str, Any]


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


class Translator:
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
