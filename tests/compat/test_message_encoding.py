"""The delivery message is encoded with orjson (workers.queue.message): the bytes the
standard library's compact encoder gave for an ASCII body, and for any body what kombu's
own decoding (base64, then its JSON loader for ``content-encoding: utf-8``) reads back."""

from __future__ import annotations

import base64
import json

import pytest
from kombu.serialization import loads

from devtools.webhooks import body_of, envelope, fixture
from workers.queue import Message


def compact(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def test_an_ascii_body_gives_the_standard_librarys_bytes() -> None:
    body = body_of(envelope("redemption.succeeded", fixture("redemption.succeeded"))).decode()
    assert body.isascii()
    raw = Message(body, "d-1", "2024-01-01T00:00:00+00:00").encode()
    outer = json.loads(raw)
    assert raw == compact(outer)
    payload = base64.b64decode(outer["body"])
    assert payload == compact(json.loads(payload))


@pytest.mark.parametrize(
    "body",
    ['{"note":"zażółć \\"gęślą\\" jaźń","emoji":"🎟"}', '{"a":"\\ud800"}', '{"a":"\\u0000"}'],
    ids=["non-ascii", "surrogate-escape", "nul-escape"],
)
def test_kombu_reads_back_the_delivery(body: str) -> None:
    message = Message(body, "d-1", "2024-01-01T00:00:00+00:00")
    outer = json.loads(message.encode())
    assert outer["properties"]["body_encoding"] == "base64"
    args, kwargs, _ = loads(
        base64.b64decode(outer["body"]), outer["content-type"], outer["content-encoding"]
    )
    assert (args, kwargs) == ([], message.kwargs())
    assert Message.decode(message.encode()) == message


def test_a_body_utf8_cannot_carry_is_still_encoded() -> None:
    # No receiver body has one (strict UTF-8); the standard library's encoder takes it.
    message = Message('{"a":"\ud800"}', "d-1", "2024-01-01T00:00:00+00:00")
    assert Message.decode(message.encode()) == message
