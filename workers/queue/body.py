"""What a delivery's body may be: the one rule the receiver and the worker share.

A JSON object, UTF-8, nested at most ``MAX_NESTING`` deep, without NaN or Infinity. The
receiver reads every signed body with ``read_webhook``: one that keeps the rule carries
its event id (the receiver remembers it, so a replay costs nothing); one that breaks it is
still enqueued, with the reason, and the worker dead-letters it (a 4xx to a signed body
would make Voucherify disable the endpoint). The worker, which may get bodies from a
re-drive or a replay too, dead-letters what nests too deep (``nests_deeper_than``) instead
of letting a parser recurse on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from schemas.envelope import read_envelope

# The deepest nesting accepted. The published payloads (tests/fixtures/voucherify) nest at
# most 8 deep (voucher.loyalty_card.pending_points.activated, its data alone), so 9 in the
# envelope; 64 leaves room for custom distribution payloads and metadata, and is far below
# the depth at which json.loads raises RecursionError (about 1,000: not a ValueError).
MAX_NESTING = 64
NOT_AN_OBJECT = "body must be a JSON object"

# The nesting is counted on the bytes, without parsing. Once escaped backslashes and
# escaped quotes are gone, every quote left opens or closes a string, so a bracket is
# outside the strings when an even number of quotes comes before it. Dropping two adjacent
# quotes keeps that parity, so only quotes and brackets are kept, the (many) adjacent pairs
# dropped, and a split on the few quotes left finds the runs outside strings. Each step is
# a linear bytes operation; the one Python loop runs over those brackets alone.
_MARKS = b'"[]{}'
_NOT_MARKS = bytes(set(range(256)) - set(_MARKS))
_OPENERS = frozenset(b"[{")


class NotAWebhook(ValueError):
    """A signed body that cannot be a webhook; the message says why, in a few words."""


def _refuse_constant(name: str) -> object:
    raise NotAWebhook("NaN and Infinity are not JSON")


# Python's json reads NaN, Infinity and -Infinity, which JSON (and PostgreSQL's jsonb,
# where the worker stores the body) does not have: refused while parsing.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


MAX_EVENT_ID_BYTES = 255
"""Longest event id the receiver remembers (the worker stores longer ones cut)."""


@dataclass(frozen=True, slots=True)
class Webhook:
    """A signed body as the receiver enqueues it."""

    text: str
    """The body as text (bytes that are not UTF-8 kept as lone surrogates, which the
    message carries as ``\\udcXX`` escapes and the worker refuses: ``NOT_UTF8``)."""
    event_id: str | None
    """``event.id``, else the envelope ``id``: what a repeat is recognised by; None for a
    body that breaks the rule, or has no id the receiver can remember."""
    refused: str | None
    """Why it breaks the rule (``NotAWebhook``'s words); None when it keeps it."""


NOT_UTF8 = "body is not UTF-8"


def read_webhook(body: bytes) -> Webhook:
    """``body`` read by the rule; never raises."""
    try:
        text, document = _read(body)
    except NotAWebhook as exc:
        return Webhook(body.decode("utf-8", "surrogateescape"), None, str(exc))
    except Exception as exc:  # noqa: BLE001 - the edge: a signed body is always enqueued
        return Webhook(body.decode("utf-8", "surrogateescape"), None, type(exc).__name__)
    event_id = read_envelope(document).event_id
    if event_id is not None and len(event_id.encode("utf-8", "surrogatepass")) > MAX_EVENT_ID_BYTES:
        event_id = None
    return Webhook(text, event_id, None)


def read_object(body: bytes) -> str:
    """``body`` as text when it is a JSON object a webhook can be; else ``NotAWebhook``.

    Linear in the body, and no recursion deeper than ``MAX_NESTING``: the nesting is counted
    before a parser sees the body. The rule is the standard library's parser (with NaN and
    Infinity refused); orjson, which reads a webhook in a third of its time, goes first:
    what it reads as an object, the standard library reads as one too (it is stricter:
    RFC 8259 only, no NaN, no lone surrogate escape, no number past a double). Whatever it
    refuses is read again by the standard library, which accepts or names the reason.
    """
    return _read(body)[0]


def _read(body: bytes) -> tuple[str, dict[str, Any]]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise NotAWebhook(NOT_UTF8) from None
    if nests_deeper_than(MAX_NESTING, body):
        raise NotAWebhook(f"nesting deeper than {MAX_NESTING}")
    try:
        document = orjson.loads(body)  # bytes: faster than the text for orjson
    except orjson.JSONDecodeError:
        pass
    else:
        if isinstance(document, dict):
            return text, document
    return text, _read_strictly(text)


def _read_strictly(text: str) -> dict[str, Any]:
    """``read_object`` by the standard library's parser alone: the rule itself."""
    try:
        document = _DECODER.decode(text)
    except NotAWebhook:
        raise
    except json.JSONDecodeError:
        raise NotAWebhook("body is not JSON") from None
    except ValueError:  # an integer past Python's 4,300-digit conversion limit
        raise NotAWebhook("number too long") from None
    if not isinstance(document, dict):
        raise NotAWebhook(NOT_AN_OBJECT)
    return document


def nests_deeper_than(limit: int, body: bytes) -> bool:
    """True when brackets outside JSON strings open more than ``limit`` levels at once."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False  # not even that many brackets: a webhook has a few dozen
    if b"\\" in body:  # none in the published payloads, and the search is cheap
        # Escaped backslashes first, so that what is left of a run of them pairs with the
        # byte after it as in JSON; then escaped quotes.
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    marks = body.translate(None, _NOT_MARKS).replace(b'""', b"")
    outside = b"".join(marks.split(b'"')[::2])
    if outside.count(b"[") + outside.count(b"{") <= limit:
        return False  # the common case: not even that many containers in all
    depth = 0
    for byte in outside:
        if byte in _OPENERS:
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False
