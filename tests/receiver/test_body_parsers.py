"""The receiver's JSON check reads with orjson first and the standard library as the rule
(workers.queue.body.read_object): whatever the bytes, its decision (the text, or the 400's
reason) is the one the standard library alone gives."""

from __future__ import annotations

import json
from typing import Any

import hypothesis
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.queue import body as body_module
from workers.queue.body import NotAWebhook, read_object


def decision(body: bytes) -> tuple[str, str]:
    try:
        return "accepted", read_object(body)
    except NotAWebhook as exc:
        return "refused", str(exc)


def by_the_standard_library_alone(body: bytes) -> tuple[str, str]:
    def refuse(_: Any) -> Any:
        raise orjson.JSONDecodeError("orjson switched off", "", 0)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(body_module.orjson, "loads", refuse)
        return decision(body)


numbers = (
    st.integers()
    | st.integers(min_value=10**300, max_value=10**320)  # past a double, not past int
    | st.floats(allow_nan=False, allow_infinity=False)
)
text = st.text(max_size=6) | st.sampled_from(["\ud800", "\udc80x", "é", "🎟", '"\\'])
documents = st.recursive(
    st.none() | st.booleans() | numbers | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=12,
)
encoded = st.builds(
    lambda document, ascii_only: json.dumps(document, ensure_ascii=ascii_only).encode(
        "utf-8", "surrogatepass"
    ),
    documents,
    st.booleans(),
)
tokens = st.sampled_from(
    [b"{", b"}", b"[", b"]", b'"a":', b",", b"1", b"-0", b"1e400", b"9" * 400, b"NaN",
     b"Infinity", b'"\\ud800"', b'"\\u00e9"', b"\xef\xbb\xbf", b" ", b"\t", b"\x00", b"tru"]
)  # fmt: skip
fragments = st.lists(tokens, max_size=12).map(b"".join)
mutated = st.tuples(encoded, st.integers(0, 40), st.binary(max_size=3)).map(
    lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]
)


@hypothesis.settings(max_examples=400)
@given(encoded | fragments | fragments.map(lambda b: b"{" + b) | mutated | st.binary(max_size=40))
def test_the_decision_is_the_standard_librarys(body: bytes) -> None:
    assert decision(body) == by_the_standard_library_alone(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"a":1e400}',  # orjson refuses a number past a double; the rule accepts it
        b'{"a":' + b"9" * 400 + b"}",
        b'{"a":"\\ud800"}',  # a lone surrogate escape: orjson refuses, the rule accepts
    ],
    ids=["1e400", "400-digit-integer", "lone-surrogate-escape"],
)
def test_what_orjson_refuses_and_the_rule_accepts_is_accepted(body: bytes) -> None:
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(body)
    assert decision(body) == ("accepted", body.decode())
