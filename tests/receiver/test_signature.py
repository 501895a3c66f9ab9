"""The signature check: Voucherify's published vectors, the whitespace-stripped form,
key rotation, and what must be rejected. Pure functions, no server."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devtools.webhooks import body_of, envelope, fixture
from receiver import signature as signature_module
from receiver.signature import (
    is_well_formed_signature,
    sign,
    strip_json_whitespace,
    verify_signature,
)

# VOUCHERIFY.md section 2: (secret, message bytes, lower-case hex HMAC-SHA256).
PUBLISHED_VECTORS = [
    (
        b"secretKey",
        b'{"a":1}',
        "a17d2ac229d1ebbb5f10e839c7985c4818e5986eab297f7e5979196d4d7d3ed2",
    ),
    (
        b"secretKey",
        b'{"a\\"b":1}',
        "f7cf97814a03146abedb9793f56e1dec34f618f82d10395310d053f749483ffb",
    ),
    (
        b"secretKey",
        b"  message  ",  # a raw string: signed with its spaces
        "53ff92957e1427ce23ad5bda9d0c5f2f4ff384d0806b83eeacb510c842d3a358",
    ),
    (
        b"secret-signature-key",
        b'{"test":"test1"}',
        "5547d4d07430a2d1b77649564c68d80afe591f7cc61ca110bccb442e3205eeec",
    ),
    (
        b"secret_01234567890_secret",
        b"Example test message",
        "776247e1a5ed607c7d1ad00d2b0f5760d4a8d5ab680b86acbcea2d3d56e55fa3",
    ),
    (
        b"secret_01234567890_secret",
        b'{"item1":123,"item2":"message","item3":{"a":1,"b":2},"item4":["a","b","c"]}',
        "e87e23da6caa7407a6177cc84ba1b26f58e1a68e24f08eba6ee023c8932b111a",
    ),
]

_WHITESPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"


@pytest.mark.parametrize(("secret", "message", "signature"), PUBLISHED_VECTORS)
def test_published_vectors_are_reproduced_and_accepted(
    secret: bytes, message: bytes, signature: str
) -> None:
    assert sign(secret, message) == signature
    assert verify_signature(message, signature, [secret])


def test_raw_string_is_signed_with_its_spaces() -> None:
    secret, message, signature = PUBLISHED_VECTORS[2]
    assert sign(secret, message.strip()) != signature
    assert verify_signature(message, signature, [secret])


def test_pretty_printed_body_signed_compactly_is_accepted() -> None:
    document = envelope("redemption.succeeded", fixture("redemption.succeeded"))
    compact = body_of(document)
    pretty = json.dumps(document, indent=2).encode()
    assert pretty != compact
    assert verify_signature(pretty, sign(b"s3cret", compact), [b"s3cret"])


def test_whitespace_inside_strings_is_kept_including_after_escaped_quotes() -> None:
    compact = b'{"note":"two  spaces, a tab\\t and \\"quoted \\" words\\"","n":1}'
    pretty = b'{\n  "note" : "two  spaces, a tab\\t and \\"quoted \\" words\\"",\n  "n": 1\n}\n'
    assert strip_json_whitespace(pretty) == compact
    assert verify_signature(pretty, sign(b"k", compact), [b"k"])
    # Whitespace dropped inside a string is a different message: rejected.
    squeezed = compact.replace(b"two  spaces", b"twospaces")
    assert not verify_signature(pretty, sign(b"k", squeezed), [b"k"])


def test_body_is_never_reserialised() -> None:
    # Same JSON value, different bytes: json.dumps would write "\u00e9" and "1.0" as it
    # likes; only the bytes as sent (or stripped of whitespace) are accepted.
    sent = '{"name":"é","amount":1.0}'.encode()
    reserialised = json.dumps(json.loads(sent), separators=(",", ":")).encode()
    assert reserialised != sent
    assert not verify_signature(sent, sign(b"k", reserialised), [b"k"])


def test_tampered_body_is_rejected() -> None:
    body = body_of(envelope("redemption.succeeded", fixture("redemption.succeeded")))
    signature = sign(b"k", body)
    tampered = body.replace(b'"amount":', b'"amount":1', 1)
    assert tampered != body
    assert verify_signature(body, signature, [b"k"])
    assert not verify_signature(tampered, signature, [b"k"])
    # One hex digit changed (whatever it was) never matches, neither form of the body.
    wrong = signature[:-1] + ("1" if signature[-1] == "0" else "0")
    assert not verify_signature(body + b" ", wrong, [b"k"])


def test_key_rotation_accepts_either_secret_and_no_other() -> None:
    body = b'{"a":1}'
    secrets = [b"old", b"new"]
    assert verify_signature(body, sign(b"old", body), secrets)
    assert verify_signature(body, sign(b"new", body), secrets)
    assert not verify_signature(body, sign(b"third", body), secrets)


@pytest.mark.parametrize("signature", [None, "", "   "])
def test_missing_or_empty_signature_is_rejected(signature: str | None) -> None:
    assert not verify_signature(b'{"a":1}', signature, [b"secretKey"])


def test_upper_case_hex_is_accepted() -> None:
    secret, message, signature = PUBLISHED_VECTORS[0]
    assert verify_signature(message, signature.upper(), [secret])


@pytest.mark.parametrize("signature", ["zz" * 32, "a17d", "é" * 64, "sha256=" + "0" * 64])
def test_malformed_signature_is_rejected(signature: str) -> None:
    assert not verify_signature(b'{"a":1}', signature, [b"secretKey"])


@pytest.mark.parametrize(
    "signature",
    [
        "a17d2ac229d1ebbb5f10e839c7985c4818e5986eab297f7e5979196d4d7d3ed2",
        "A17D2AC229D1EBBB5F10E839C7985C4818E5986EAB297F7E5979196D4D7D3ED2",
        "a17D2ac229d1ebbb5f10e839c7985c4818e5986eab297f7e5979196d4d7d3eD2",
        " \ta17d2ac229d1ebbb5f10e839c7985c4818e5986eab297f7e5979196d4d7d3ed2\r\n",
    ],
    ids=["lower", "upper", "mixed", "surrounding-whitespace"],
)
def test_well_formed_signature_is_64_hex_characters_in_either_case(signature: str) -> None:
    assert is_well_formed_signature(signature)
    assert verify_signature(b'{"a":1}', signature, [b"secretKey"])


MALFORMED = {
    "missing": None,
    "empty": "",
    "blank": "   ",
    "63-hex": "a" * 63,
    "65-hex": "a" * 65,
    "128-hex": "a" * 128,
    "non-hex": "g" * 64,
    "prefixed": "sha256=" + "a" * 64,
    "0x": "0x" + "a" * 62,
    "inner-space": "a" * 32 + " " + "a" * 31,
    "unicode-digits": "\u0660" * 64,  # ARABIC-INDIC DIGIT ZERO: a digit, not hex
    "fullwidth": "\uff41" * 64,  # FULLWIDTH LATIN SMALL LETTER A
    "latin-1": "\xe9" * 64,
    "nul": "a" * 63 + "\x00",
}


@pytest.mark.parametrize("signature", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_signature_is_told_without_any_hmac(
    signature: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_hmac(*args: object, **kwargs: object) -> None:
        raise AssertionError("an HMAC was computed for a malformed signature")

    monkeypatch.setattr(signature_module.hmac, "new", no_hmac)
    assert not is_well_formed_signature(signature)
    assert not verify_signature(b'{"a":1}' + b" " * 1000, signature, [b"k1", b"k2"])


@given(st.text(max_size=80))
def test_well_formed_is_exactly_64_hex_after_strip(text: str) -> None:
    stripped = text.strip()
    expected = len(stripped) == 64 and all(c in "0123456789abcdefABCDEF" for c in stripped)
    assert is_well_formed_signature(text) is expected


def test_no_secret_accepts_nothing() -> None:
    assert not verify_signature(b'{"a":1}', sign(b"", b'{"a":1}'), [])


def test_stripping_takes_linear_time_on_hostile_bodies() -> None:
    # Unauthenticated input: a body of backslash-quote pairs made the former regex retry
    # an unterminated string from every quote (quadratic; hours for 1 MB). This finishes
    # at once now; were it quadratic again, the test would hit pytest's timeout.
    for hostile in (b'\\"' * 500_000 + b" ", b'" ' * 500_000, b'{"a":"' + b"\\ " * 500_000):
        stripped = strip_json_whitespace(hostile)
        assert len(stripped) <= len(hostile)
        assert not verify_signature(hostile, "0" * 64, [b"k"])


def _java_strip(body: bytes) -> bytes:
    """The documented Java sample's loop: drop whitespace outside strings, honour escapes."""
    out = bytearray()
    in_string = escaped = False
    for byte in body:
        char = chr(byte)
        if in_string:
            out.append(byte)
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
            out.append(byte)
        elif char not in _WHITESPACE:
            out.append(byte)
    return bytes(out)


@given(st.binary(max_size=64) | st.text(alphabet='"\\ \n\tab{}:,é', max_size=64).map(str.encode))
def test_stripping_matches_the_documented_loop(body: bytes) -> None:
    assert strip_json_whitespace(body) == _java_strip(body)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=12,
    ),
    st.sampled_from([None, 1, 2, "\t"]),
)
def test_any_json_pretty_printed_verifies_against_its_compact_signature(
    value: object, indent: int | str | None
) -> None:
    compact = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    pretty = json.dumps(value, indent=indent, ensure_ascii=False).encode()
    assert strip_json_whitespace(pretty) == compact
    assert verify_signature(pretty, sign(b"k", compact), [b"k"])
