"""What a delivery's body may be: the one rule the receiver and the worker share.

A JSON object, UTF-8, nested at most ``MAX_NESTING`` deep, without NaN or Infinity. The
receiver refuses anything else with a 400 naming why (``read_object``); the worker, which
may get bodies an older receiver, a re-drive or a replay let through, dead-letters what
nests too deep (``nests_deeper_than``) instead of letting a parser recurse on it.
"""

from __future__ import annotations

import json

import orjson

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


def read_object(body: bytes) -> str:
    """``body`` as text when it is a JSON object a webhook can be; else ``NotAWebhook``.

    Linear in the body, and no recursion deeper than ``MAX_NESTING``: the nesting is counted
    before a parser sees the body. The rule is the standard library's parser (with NaN and
    Infinity refused); orjson, which reads a webhook in a third of its time, goes first:
    what it reads as an object, the standard library reads as one too (it is stricter:
    RFC 8259 only, no NaN, no lone surrogate escape, no number past a double). Whatever it
    refuses is read again by the standard library, which accepts or names the reason.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise NotAWebhook("body is not UTF-8") from None
    if nests_deeper_than(MAX_NESTING, body):
        raise NotAWebhook(f"nesting deeper than {MAX_NESTING}")
    try:
        if isinstance(orjson.loads(body), dict):  # bytes: faster than the text for orjson
            return text
    except orjson.JSONDecodeError:
        pass
    return _read_strictly(text)


def _read_strictly(text: str) -> str:
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
    return text


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
