"""One message from the receiver, read enough to be recorded, whatever it holds.

``read_delivery`` never raises: a body that is not a JSON object has no envelope; an event
id or type PostgreSQL cannot store or index (a NUL, a lone surrogate, longer than
``MAX_ID_LENGTH``) is stored sanitised (``storable``) and the delivery marked refused; a
body nested deeper than ``MAX_NESTING`` too, whatever the stack depth of the process
reading it. ``Delivery.body_forms`` says where the raw body can be kept: ``payload``
(jsonb) when PostgreSQL takes it, else ``raw_body`` (text, byte for byte), else nowhere.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
import psycopg
from psycopg.adapt import Dumper

from schemas.envelope import Envelope, read_envelope
from workers.queue.body import MAX_NESTING, NOT_UTF8, nests_deeper_than

MAX_ID_LENGTH = 255
"""Longest event id or type stored as it came: far below the btree limit (2704 bytes) even
in four-byte characters. Longer ones are stored cut, with a hash (``storable``)."""

BodyForm = Literal["jsonb", "text", "none"]
"""Where an event's raw body is stored: ``payload`` (jsonb), ``raw_body`` (text), or not at all."""

UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
"""Characters no PostgreSQL text can hold: NUL, and surrogates (not encodable as UTF-8)."""
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message from the receiver, identified enough to be recorded."""

    delivery_id: str
    received_at: datetime
    body: str
    document: dict[str, Any] | None
    envelope: Envelope | None
    event_id: str
    """``event.id``, else the envelope id, else ``delivery:<delivery id>``; storable."""
    type: str
    """The event type ('' when none); storable."""
    refused: str | None = None
    """Why the delivery cannot be stored as it came (an id, its nesting): dead at once."""
    jsonb: bool = True
    """Whether ``payload`` (jsonb) may be asked to take the body: a JSON object not too deep."""
    strict: bool = True
    """Whether the body is JSON as the standard has it (no NaN, no Infinity): only such a
    body is applied with its text kept when jsonb refuses it (a ``\\u0000`` escape)."""

    def body_forms(self) -> Iterator[BodyForm]:
        """Where to try to keep the body, best first; the last one always fits."""
        if self.jsonb:
            yield "jsonb"
        if self.body and UNSTORABLE.search(self.body) is None:
            yield "text"
        yield "none"

    def kept_forms(self) -> list[BodyForm]:
        """The forms an event is applied with: jsonb, then (strict JSON only) its text."""
        forms: list[BodyForm] = [form for form in self.body_forms() if form != "none"]
        return forms if self.strict else forms[:1]

    def inbox_params(self, form: BodyForm | None = None) -> dict[str, Any]:
        form = form or next(self.body_forms())
        return {
            "event_id": self.event_id,
            "type": self.type,
            "payload": self.body if form == "jsonb" else None,
            "raw_body": self.body if form == "text" else None,
            "event_created_at": parse_time(
                self.envelope.event_created_at if self.envelope else None
            ),
            "received_at": self.received_at,
            "delivery_id": self.delivery_id,
        }


def read_delivery(body: str, delivery_id: str, received_at: str) -> Delivery:
    """What a delivery is, never raising: a body that is not a JSON object has no envelope."""
    too_deep = nests_deeper_than(MAX_NESTING, body.encode("utf-8", "surrogatepass"))
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the stack
        document = None
    if not isinstance(document, dict):
        document = None
    envelope = read_envelope(document) if document is not None else None
    delivery_id, _ = storable(delivery_id, "delivery id")
    event_id, id_problem = storable(
        envelope.event_id if envelope and envelope.event_id else f"delivery:{delivery_id}",
        "event id",
    )
    event_type, type_problem = storable(envelope.type if envelope else "", "event type")
    problem = id_problem or type_problem
    if problem is None and too_deep:
        problem = f"JSON nested over {MAX_NESTING} levels deep"
    if problem is None and _SURROGATE.search(body):
        # Valid UTF-8 never decodes to a surrogate: bytes the receiver kept as such.
        problem = NOT_UTF8
    return Delivery(
        delivery_id=delivery_id,
        received_at=parse_time(received_at) or datetime.now(UTC),
        body=body,
        document=document,
        envelope=envelope,
        event_id=event_id,
        type=event_type,
        refused=f"not storable: {problem}" if problem else None,
        jsonb=document is not None and not too_deep,
        strict=document is not None and _strict(body),
    )


def _refuse_constant(name: str) -> object:
    raise ValueError(name)


def _strict(body: str) -> bool:
    """No NaN, Infinity or -Infinity in it (the body already parsed once)."""
    if "NaN" not in body and "Infinity" not in body:
        return True  # the common case, without a second parse
    try:
        json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return False
    return True


def storable(text: str, what: str) -> tuple[str, str | None]:
    """``text`` as PostgreSQL can store and index it, and what had to change (None: nothing).

    NUL characters and lone surrogates become U+FFFD, and the text is cut to
    ``MAX_ID_LENGTH`` with a hash of the original at the end, so two different ids never
    end as one: a later delivery of the same event finds the same row.
    """
    if "\x00" in text:
        problem = f"the {what} holds a NUL character"
    elif _SURROGATE.search(text):
        problem = f"the {what} holds a lone surrogate"
    elif len(text) > MAX_ID_LENGTH:
        problem = f"the {what} is over {MAX_ID_LENGTH} characters"
    else:
        return text, None
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    kept = UNSTORABLE.sub("\ufffd", text)[: MAX_ID_LENGTH - len(digest) - 1]
    return f"{kept}~{digest}", problem


def parse_time(text: str | None) -> datetime | None:
    """An ISO 8601 time as PostgreSQL can store it (in UTC; naive taken as UTC), else None."""
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (ValueError, OverflowError):  # +25:00, year 0, or out of range once in UTC
        return None


class StorableText(Dumper):
    """Text parameters as PostgreSQL can store them: NUL and lone surrogates (which a JSON
    string may carry, and no PostgreSQL text can) become U+FFFD. The typed columns of an
    event's effects get that; the raw body is kept as it came (``body_forms``)."""

    oid = 0  # unknown, as psycopg's own str dumper: the server infers the type

    def dump(self, obj: str) -> bytes:
        if not obj.isascii() or "\x00" in obj:
            obj = UNSTORABLE.sub("\ufffd", obj)
        return obj.encode()


def storable_text(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    """``conn`` with ``StorableText`` for every ``str`` parameter (1.5 µs; idempotent)."""
    conn.adapters.register_dumper(str, StorableText)
    return conn


ROW_OBJECTS = ("redemption", "redemption_rollback", "order", "voucher")
"""The objects under ``data`` whose ids name rows the handlers write (redemptions, orders,
card balances and ledger entries); a redemption names its order, card and parent too.
Not the customer nor the campaign: no row of theirs is locked, and every card of a
campaign names the same one."""


def contention_keys(body: str) -> frozenset[str]:
    """The ids of the rows a delivery's event may write, read cheaply enough for the
    consumer (``workers.batching``): the event's own row, and the ids of ``ROW_OBJECTS``.
    Two batches in flight never share one, so they never wait on each other's row locks.
    A body orjson cannot read (not JSON, nested over its limit, a lone surrogate) has
    none: it is dead-lettered, it takes no lock another batch holds."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return frozenset()
    if not isinstance(document, dict):
        return frozenset()
    envelope = read_envelope(document)
    keys = {f"event:{envelope.event_id}"} if envelope.event_id else set()
    data = envelope.data if isinstance(envelope.data, dict) else {}
    for name in ROW_OBJECTS:
        value = data.get(name)
        if not isinstance(value, dict):
            continue
        _add_id(keys, value.get("id"))
        _add_id(keys, value.get("redemption"))  # a rollback's parent redemption
        for inner in ROW_OBJECTS:
            nested = value.get(inner)
            if isinstance(nested, dict):
                _add_id(keys, nested.get("id"))
    return frozenset(keys)


def _add_id(keys: set[str], value: Any) -> None:
    if isinstance(value, str) and value:
        keys.add(value)
