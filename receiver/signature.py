"""Voucherify webhook signatures: HMAC-SHA256, lower-case hex, over the raw body.

Pure functions on bytes, no parsing. Voucherify's documentation signs the JSON payload
with the whitespace outside JSON strings removed; what it sends is normally already
compact, so the raw bytes are tried first and the stripped form only when they fail. The
body is never re-serialised: a JSON round trip can change escapes, number formatting and
key order, and then no signature would match.

A header that cannot be a digest (not 64 hex characters) is told apart before anything
else, without the body: the view asks ``is_well_formed_signature`` before it reads the
body, and ``verify_signature`` starts with the same check, so a malformed header never
costs an HMAC.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from typing import TypeGuard

# What the stripped form keeps: runs of bytes that are neither whitespace nor a quote, and
# JSON strings as they are (escapes included); whatever lies between (whitespace outside
# strings) is dropped. The whitespace set follows the documented Java sample
# (Character.isWhitespace). The body is not authenticated yet, so this must take linear
# time on any input: the string branch is an unrolled loop whose closing quote is
# optional, so a string left open runs to the end of the body (as in the Java loop)
# instead of failing and being retried from every later quote (quadratic: a 32 KB body of
# backslash-quote pairs took 6 s, a 1 MB one would have taken hours).
_WHITESPACE = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"
_KEPT = re.compile(rb'(?:[^"\s\x1c-\x1f]+|"[^"\\]*(?:\\.[^"\\]*)*"?)+', re.DOTALL)

# A hex HMAC-SHA256 digest: 32 bytes, 64 hex characters. Either case: Voucherify sends
# lower case, and upper case costs nothing to accept.
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


def sign(secret: bytes, message: bytes) -> str:
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def strip_json_whitespace(body: bytes) -> bytes:
    """The body with every whitespace byte outside JSON strings removed."""
    if len(body.translate(None, _WHITESPACE)) == len(body):
        return body  # no whitespace at all: nothing to strip (a C-speed check)
    return b"".join(_KEPT.findall(body))


def is_well_formed_signature(signature: str | None) -> TypeGuard[str]:
    """True when ``signature`` (surrounding whitespace aside) is 64 hex characters.

    No body, no secret, no HMAC: a header that fails this can match nothing.
    """
    return signature is not None and _HEX_DIGEST.fullmatch(signature.strip()) is not None


def verify_signature(body: bytes, signature: str | None, secrets: Iterable[bytes]) -> bool:
    """True when ``signature`` matches ``body`` (as sent, or whitespace-stripped) for a secret."""
    if not is_well_formed_signature(signature):
        return False  # before any HMAC: a malformed header costs nothing
    expected = signature.strip().lower().encode("ascii")
    secrets = tuple(secrets)
    if _matches_any(body, expected, secrets):
        return True
    stripped = strip_json_whitespace(body)
    return stripped != body and _matches_any(stripped, expected, secrets)


def _matches_any(message: bytes, expected: bytes, secrets: tuple[bytes, ...]) -> bool:
    matched = False
    for secret in secrets:
        # Every secret is tried: the time taken does not tell which one matched.
        digest = hmac.new(secret, message, hashlib.sha256).hexdigest().encode()
        matched |= hmac.compare_digest(digest, expected)
    return matched
