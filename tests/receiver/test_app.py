"""The receiver app against docs/contract.md's Receiver section: every answer, and what lands
in Redis (a real server) for each. Flask's test client, except where noted."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import hypothesis
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.test import EnvironBuilder, TestResponse, run_wsgi_app

from config.settings import Settings, SettingsError
from devtools.servers import free_port
from devtools.webhooks import SECRET, body_of, envelope, fixture, sign
from web.app import create_app
from workers.queue import DELIVERY_QUEUE, PROCESS_DELIVERY_TASK
from workers.queue.body import read_webhook

WEBHOOK = "/webhooks/voucherify"


@pytest.fixture
def make_settings(database_url: str, redis_url: str) -> Callable[..., Settings]:
    """Settings on the test servers, with some variables overridden (None drops one)."""

    def make(**overrides: str | None) -> Settings:
        env = {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "VOUCHERIFY_WEBHOOK_SECRET": SECRET,
        }
        for name, value in overrides.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return Settings.from_env(env)

    return make


@pytest.fixture
def client(settings: Settings) -> FlaskClient:
    return create_app(settings).test_client()


def post(
    client: FlaskClient,
    body: bytes,
    signature: str | None = "sign",
    content_type: str | None = "application/json",
) -> TestResponse:
    headers = {}
    if signature == "sign":
        signature = sign(body)
    if signature is not None:
        headers["x-voucherify-signature"] = signature
    if content_type is not None:
        headers["Content-Type"] = content_type
    return client.post(WEBHOOK, data=body, headers=headers)


def queued(redis_client: redis.Redis) -> list[dict[str, Any]]:
    """The messages on the deliveries list, oldest first, with their body decoded."""
    messages = []
    for raw in reversed(redis_client.lrange(DELIVERY_QUEUE, 0, -1)):
        message = json.loads(raw)
        message["decoded_body"] = json.loads(base64.b64decode(message["body"]))
        messages.append(message)
    return messages


def assert_refused(
    client: FlaskClient,
    redis_client: redis.Redis,
    body: bytes,
    status: int,
    error: str,
    signature: str | None = "sign",
) -> None:
    """``body`` is answered ``status`` with ``{"error": error}``, and nothing is stored."""
    response = post(client, body, signature=signature)
    assert response.status_code == status
    assert response.get_json() == {"error": error}
    assert redis_client.dbsize() == 0


def redemption_body() -> bytes:
    return body_of(envelope("redemption.succeeded", fixture("redemption.succeeded")))


# --- 202 ----------------------------------------------------------------------------------


def test_valid_delivery_is_accepted_and_the_raw_body_is_in_redis(
    client: FlaskClient, redis_client: redis.Redis
) -> None:
    body = redemption_body()
    before = datetime.now().astimezone()
    response = post(client, body)

    assert response.status_code == 202
    assert response.mimetype == "application/json"
    answer = response.get_json()
    assert answer == {"status": "accepted", "delivery_id": answer["delivery_id"]}
    assert answer["delivery_id"]

    [message] = queued(redis_client)
    args, kwargs, embed = message["decoded_body"]
    assert args == []
    assert kwargs["body"] == body.decode()
    assert kwargs["delivery_id"] == answer["delivery_id"]
    received_at = datetime.fromisoformat(kwargs["received_at"])
    assert received_at.tzinfo is not None
    assert before - timedelta(seconds=1) <= received_at <= datetime.now().astimezone()
    assert set(kwargs) == {"body", "delivery_id", "received_at"}
    assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    # The kombu envelope a Celery worker consumes.
    assert message["headers"]["task"] == PROCESS_DELIVERY_TASK == "voucherify.process_delivery"
    assert message["headers"]["id"] == answer["delivery_id"]
    # Celery logs the headers' reprs: the body never appears in them.
    assert "Jane Doe" in kwargs["body"]
    assert "Jane Doe" not in json.dumps(message["headers"])
    assert "<redacted>" in message["headers"]["kwargsrepr"]
    assert message["content-type"] == "application/json"
    assert message["content-encoding"] == "utf-8"
    assert message["properties"]["body_encoding"] == "base64"
    assert message["properties"]["delivery_info"]["routing_key"] == DELIVERY_QUEUE


def test_each_delivery_gets_its_own_id(client: FlaskClient, redis_client: redis.Redis) -> None:
    first = post(client, redemption_body()).get_json()["delivery_id"]
    other = body_of(
        envelope("redemption.succeeded", fixture("redemption.succeeded"), event_id="ev_other")
    )
    second = post(client, other).get_json()["delivery_id"]
    assert first != second
    assert [m["decoded_body"][1]["delivery_id"] for m in queued(redis_client)] == [first, second]


def test_pretty_printed_body_signed_compactly_is_enqueued_as_sent(
    client: FlaskClient, redis_client: redis.Redis
) -> None:
    document = envelope("redemption.succeeded", fixture("redemption.succeeded"))
    pretty = json.dumps(document, indent=2, ensure_ascii=False).encode()
    response = post(client, pretty, signature=sign(body_of(document)))
    assert response.status_code == 202
    [message] = queued(redis_client)
    assert message["decoded_body"][1]["body"] == pretty.decode()


def test_non_ascii_body_is_enqueued_exactly(client: FlaskClient, redis_client: redis.Redis) -> None:
    body = '{"note":"zażółć \\"gęślą\\" jaźń","emoji":"🎟"}'.encode()
    assert post(client, body).status_code == 202
    [message] = queued(redis_client)
    assert message["decoded_body"][1]["body"] == body.decode()


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "application/vnd.voucherify+json"],
)
def test_json_content_types_are_accepted(
    client: FlaskClient, redis_client: redis.Redis, content_type: str
) -> None:
    assert post(client, b'{"a":1}', content_type=content_type).status_code == 202
    assert redis_client.llen(DELIVERY_QUEUE) == 1


def test_rotated_secrets_are_both_accepted(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> None:
    client = create_app(
        make_settings(VOUCHERIFY_WEBHOOK_SECRET="old-secret, new-secret")
    ).test_client()
    body = b'{"a":1}'
    assert post(client, body, signature=sign(body, "old-secret")).status_code == 202
    assert post(client, body, signature=sign(body, "new-secret")).status_code == 202
    assert post(client, body, signature=sign(body, "third-secret")).status_code == 401
    assert redis_client.llen(DELIVERY_QUEUE) == 2


# --- 401 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "signature",
    [
        None,
        "",
        "0" * 64,
        sign(b'{"a":1}', "another-secret"),
        sign(b'{"a":2}'),  # right secret, other body (a tampered delivery)
    ],
    ids=["missing", "empty", "zeros", "other-secret", "tampered"],
)
def test_invalid_signature_is_401_and_nothing_is_stored(
    client: FlaskClient, redis_client: redis.Redis, signature: str | None
) -> None:
    assert_refused(client, redis_client, b'{"a":1}', 401, "invalid_signature", signature)


def test_a_flood_of_401s_is_counted_each_and_logged_once_a_minute_per_source(
    client: FlaskClient, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import receiver.intake as intake

    monkeypatch.setattr(intake, "_last_logged", {})
    clock = [1000.0]
    monkeypatch.setattr(intake.time, "monotonic", lambda: clock[0])
    before = metric_value(client, "receiver_invalid_signatures_total")

    def forged(source: str) -> None:
        headers = {"Content-Type": "application/json", "x-voucherify-signature": "0" * 64}
        response = client.post(
            WEBHOOK, data=b'{"a":1}', headers=headers, environ_base={"REMOTE_ADDR": source}
        )
        assert response.status_code == 401

    def logged() -> list[tuple[str, int]]:
        return [(r.source, r.not_logged) for r in caplog.records if r.msg == "delivery.rejected"]

    with caplog.at_level("INFO", logger="receiver.intake"):
        for _ in range(500):
            forged("203.0.113.7")
        forged("198.51.100.1")  # another source: a line of its own
        assert logged() == [("203.0.113.7", 0), ("198.51.100.1", 0)]
        clock[0] += 61
        forged("203.0.113.7")
        assert logged()[-1] == ("203.0.113.7", 499)  # with how many were not logged

    assert metric_value(client, "receiver_invalid_signatures_total") == before + 502


class WatchedBody(io.RawIOBase):
    """A request body that counts every read the app makes of it."""

    def __init__(self, body: bytes) -> None:
        self.body = io.BytesIO(body)
        self.reads = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self.reads += 1
        return self.body.readinto(buffer)


def sent_as_stream(
    app: Flask, body: bytes, signature: str | None, chunked: bool
) -> tuple[str, bytes, WatchedBody]:
    """POST ``body`` from a WatchedBody, with its Content-Length or without (chunked)."""
    stream = WatchedBody(body)
    headers = [] if signature is None else [("x-voucherify-signature", signature)]
    environ = EnvironBuilder(
        path=WEBHOOK, method="POST", content_type="application/json", headers=headers
    ).get_environ()
    if chunked:
        environ.pop("CONTENT_LENGTH", None)
        environ["wsgi.input_terminated"] = True
    else:
        environ["CONTENT_LENGTH"] = str(len(body))
    environ["wsgi.input"] = stream
    app_iter, status, _ = run_wsgi_app(app, environ, buffered=True)
    return status, b"".join(app_iter), stream


MALFORMED_SIGNATURES = {
    "missing": None,
    "empty": "",
    "blank": "   ",
    "too-short": sign(b'{"a":1}')[:63],
    "too-long": sign(b'{"a":1}') + "0",
    "non-hex": "g" * 64,
    "prefixed": "sha256=" + sign(b'{"a":1}'),
    "base64": base64.b64encode(bytes(32)).decode() + "=" * 20,
    "non-ascii": "é" * 64,
    "inner-space": sign(b'{"a":1}')[:32] + " " + sign(b'{"a":1}')[32:63],
}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(
    "signature", list(MALFORMED_SIGNATURES.values()), ids=list(MALFORMED_SIGNATURES)
)
def test_malformed_signature_header_is_401_without_reading_the_body(
    settings: Settings, redis_client: redis.Redis, signature: str | None, chunked: bool
) -> None:
    status, answer, stream = sent_as_stream(create_app(settings), b'{"a":1}', signature, chunked)
    assert status.startswith("401")
    assert json.loads(answer) == {"error": "invalid_signature"}
    assert stream.reads == 0
    assert redis_client.dbsize() == 0


def test_well_formed_signature_header_is_read_and_checked_against_the_body(
    settings: Settings, redis_client: redis.Redis
) -> None:
    # The control of the test above: a WatchedBody does see the reads of a request
    # whose header has the form of a digest (right or wrong).
    body = b'{"a":1}'
    app = create_app(settings)
    status, _, stream = sent_as_stream(app, body, "0" * 64, chunked=False)
    assert status.startswith("401")
    assert stream.reads > 0
    assert redis_client.dbsize() == 0
    status, _, stream = sent_as_stream(app, body, f"  {sign(body).upper()} ", chunked=True)
    assert status.startswith("202")
    assert stream.reads > 0
    assert redis_client.llen(DELIVERY_QUEUE) == 1


def test_app_cannot_be_built_without_a_secret(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(SettingsError, match=r"^VOUCHERIFY_WEBHOOK_SECRET: "):
        create_app(make_settings(VOUCHERIFY_WEBHOOK_SECRET=None))


# --- signed bodies that break the body rule: 202, enqueued for a dead letter ------------
# A 4xx to a signed body would be retried by Voucherify, 12 times, then the endpoint
# disabled: every correctly signed body is enqueued, and the worker dead-letters what it
# cannot process (tests/e2e/test_hostile_input.py follows them to their dead letter).


NOT_AN_OBJECT = "body must be a JSON object"
NOT_JSON = "body is not JSON"
NAN = "NaN and Infinity are not JSON"
TOO_DEEP = "nesting deeper than 64"  # workers.queue.body.MAX_NESTING
NOT_UTF8 = "body is not UTF-8"


def assert_enqueued_as_sent(
    client: FlaskClient, redis_client: redis.Redis, body: bytes
) -> dict[str, Any]:
    """``body`` signed is answered 202 and enqueued as it came (bytes that are not UTF-8
    as lone surrogates, which the worker refuses); the message's kwargs."""
    response = post(client, body)
    assert response.status_code == 202, response.get_data()
    assert set(response.get_json()) == {"status", "delivery_id"}
    [message] = queued(redis_client)
    kwargs: dict[str, Any] = message["decoded_body"][1]
    assert kwargs["body"].encode("utf-8", "surrogateescape") == body
    assert kwargs["delivery_id"] == response.get_json()["delivery_id"]
    assert redis_client.hexists("deliveries.accepted", kwargs["delivery_id"])
    return kwargs


UNPROCESSABLE = [
    (b"[1,2,3]", NOT_AN_OBJECT),
    (b'"a string"', NOT_AN_OBJECT),
    (b"42", NOT_AN_OBJECT),
    (b"null", NOT_AN_OBJECT),
    (b'{"a":', NOT_JSON),
    (b"", NOT_JSON),
    (b'{"a":1} {"b":2}', NOT_JSON),
    (b'\xef\xbb\xbf{"a":1}', NOT_JSON),  # a UTF-8 byte order mark
    (b'{"a":"tab\there"}', NOT_JSON),  # a raw control character inside a string
    (b'{"a":' + b"9" * 5000 + b"}", "number too long"),  # Python's int limit
    (b'{"a":"\xff\xfe"}', NOT_UTF8),
    (b'{"a":"\xed\xa0\x80"}', NOT_UTF8),  # an encoded surrogate
    (b'{"a":NaN}', NAN),
    (b'{"a":[Infinity,2]}', NAN),
    (b'{"data":{"amount":-Infinity},"type":"redemption.succeeded"}', NAN),
]
UNPROCESSABLE_IDS = [
    "array",
    "string",
    "number",
    "null",
    "invalid-json",
    "empty",
    "two-documents",
    "bom",
    "control-character",
    "5000-digit-integer",
    "invalid-utf8",
    "utf8-surrogate",
    "nan",
    "infinity-in-array",
    "minus-infinity-in-envelope",
]


@pytest.mark.parametrize(("body", "reason"), UNPROCESSABLE, ids=UNPROCESSABLE_IDS)
def test_a_signed_body_that_breaks_the_rule_is_202_and_enqueued_with_its_reason_counted(
    client: FlaskClient, redis_client: redis.Redis, body: bytes, reason: str
) -> None:
    assert read_webhook(body).refused == reason  # what the receiver logs and counts
    before = metric_value(client, "receiver_unprocessable_total")
    assert_enqueued_as_sent(client, redis_client, body)
    assert metric_value(client, "receiver_unprocessable_total") == before + 1


def metric_value(client: FlaskClient, name: str) -> float:
    text = client.get("/metrics").get_data(as_text=True)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return 0.0


def nested(depth: int, opener: str) -> bytes:
    """A JSON object ``depth`` levels deep: the object itself, then arrays or objects."""
    inner = "1"
    for _ in range(depth - 1):
        inner = f"[{inner}]" if opener == "[" else f'{{"a":{inner}}}'
    return f'{{"a":{inner}}}'.encode()


@pytest.mark.parametrize(
    "body",
    [
        nested(65, "["),
        nested(65, "{"),
        nested(2_000, "["),
        nested(2_000, "{"),
        b"[" * 100_000,
        b'{"a":' + b"[" * 100_000,
        b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
    ],
    ids=[
        "65-arrays",
        "65-objects",
        "2000-arrays",
        "2000-objects",
        "100000-open",
        "object-100000-open",
        "balanced",
        "keys",
    ],
)
def test_deep_nesting_is_202_and_enqueued_not_a_server_error(
    client: FlaskClient, redis_client: redis.Redis, body: bytes
) -> None:
    # Python's json raises RecursionError (not a ValueError) past ~1,000 levels: the
    # nesting is counted first, without recursion, in time linear in the body.
    assert read_webhook(body).refused == TOO_DEEP
    assert_enqueued_as_sent(client, redis_client, body)


@pytest.mark.parametrize("opener", ["[", "{"], ids=["arrays", "objects"])
def test_nesting_up_to_the_limit_keeps_the_rule(opener: str) -> None:
    assert json.loads(nested(64, opener))  # what the rule accepts, Python reads
    assert read_webhook(nested(64, opener)).refused is None
    assert read_webhook(nested(65, opener)).refused == TOO_DEEP


@pytest.mark.parametrize(
    "body",
    [
        b'{"a":"' + b"[" * 1000 + b'"}',
        b'{"a":"\\"' + b"[" * 1000 + b'"}',  # after an escaped quote, still inside
        b'{"' + b"{" * 1000 + b'":1}',  # in a key
        b'{"a":"\\\\","b":"' + b"[" * 1000 + b'"}',  # an escaped backslash, then a string
    ],
    ids=["in-a-string", "after-escaped-quote", "in-a-key", "after-escaped-backslash"],
)
def test_brackets_inside_strings_are_not_nesting(body: bytes) -> None:
    assert isinstance(json.loads(body), dict)
    assert read_webhook(body).refused is None


@pytest.mark.parametrize(
    "body",
    [b'{"a":"NaN"}', b'{"NaN":"Infinity","b":["-Infinity"]}', b'{"a":"x NaN y"}'],
    ids=["value", "key-and-array", "inside-text"],
)
def test_nan_and_infinity_as_strings_keep_the_rule(body: bytes) -> None:
    assert read_webhook(body).refused is None


@pytest.mark.parametrize("error", [RecursionError, MemoryError, KeyError, RuntimeError])
def test_any_failure_reading_the_body_is_still_202_and_enqueued(
    client: FlaskClient,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    error: type[BaseException],
) -> None:
    def fail(body: bytes) -> str:
        raise error("from the parser")

    monkeypatch.setattr("workers.queue.body._read", fail)
    assert_enqueued_as_sent(client, redis_client, b'{"a":1}')


# A function-scoped client shared by a property's examples is fine: the app keeps no state
# between requests, and what the 202s leave in Redis is flushed after the test.
PROPERTY = hypothesis.settings(
    max_examples=100,
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture],
)
tricky_text = st.text(alphabet='[]{}"\\ aNI\n\u00e9\U0001f39f', max_size=8) | st.text(max_size=8)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | tricky_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(tricky_text, inner, max_size=4),
    max_leaves=20,
)


@PROPERTY
@given(json_values, st.sampled_from([None, 2]), st.booleans())
def test_any_json_document_keeps_the_rule_when_an_object(
    document: Any, indent: int | None, ensure_ascii: bool
) -> None:
    body = json.dumps(document, indent=indent, ensure_ascii=ensure_ascii).encode()
    refused = read_webhook(body).refused
    assert (refused is None) == isinstance(document, dict)


def depth_of(document: Any) -> int:
    deepest, pending = 0, [(document, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, depth)
            children = value.values() if isinstance(value, dict) else value
            pending.extend((child, depth + 1) for child in children)
    return deepest


@PROPERTY
@given(json_values, st.lists(st.sampled_from(["[", "{"]), min_size=50, max_size=70))
def test_nesting_is_counted_as_the_parser_sees_it(inner: Any, wrappers: list[str]) -> None:
    document: Any = inner
    for opener in wrappers:
        document = [document] if opener == "[" else {'"[{': document}
    document = {"w": document}
    refused = read_webhook(json.dumps(document).encode()).refused
    too_deep = depth_of(document) > 64
    hypothesis.event("too deep" if too_deep else "within the limit")
    assert refused == (TOO_DEEP if too_deep else None)


def refuse(constant: str) -> None:
    raise AssertionError(f"{constant} accepted")


json_ish_bytes = st.text(alphabet='[]{}":,0123456789.eE+- \\nuaNIfinity\u00e9', max_size=64).map(
    str.encode
)
# Runs of one piece, up to 3,000 times: deep nesting (Python's json gives up near 1,000),
# NaN and Infinity, strings and escapes, in any order and mostly not JSON.
PIECES = [b"[", b"{", b'{"a":', b"]", b"}", b",", b'"', b"\\", b"NaN", b"-Infinity", b"1", b" "]
runs = st.lists(
    st.tuples(st.sampled_from(PIECES), st.integers(1, 3_000)).map(lambda run: run[0] * run[1]),
    max_size=5,
).map(b"".join)


@PROPERTY
@given(
    st.binary(max_size=256)
    | json_ish_bytes
    | json_ish_bytes.map(lambda b: b"{" + b)
    | runs
    | runs.map(lambda b: b'{"a":' + b)
)
def test_any_bytes_signed_are_202_and_enqueued_as_sent(
    client: FlaskClient, redis_client: redis.Redis, body: bytes
) -> None:
    redis_client.delete(DELIVERY_QUEUE)
    kwargs = assert_enqueued_as_sent(client, redis_client, body)
    if read_webhook(body).refused is None:  # then it is a JSON object as the worker reads it
        document = json.loads(kwargs["body"], parse_constant=refuse)
        assert isinstance(document, dict)
        assert depth_of(document) <= 64


# --- repeats ---------------------------------------------------------------------------


def test_a_repeat_of_an_accepted_event_id_is_202_with_the_first_delivery_and_nothing_queued(
    client: FlaskClient, redis_client: redis.Redis
) -> None:
    body = redemption_body()
    first = post(client, body)
    assert first.status_code == 202
    for _ in range(20):
        again = post(client, body)
        assert again.status_code == 202
        assert again.get_json() == first.get_json()  # the same body
    assert redis_client.llen(DELIVERY_QUEUE) == 1
    assert redis_client.hlen("deliveries.accepted") == 1
    assert metric_value(client, "receiver_repeats_total") >= 20
    # Remembered for days, not for ever.
    [key] = redis_client.keys("deliveries.seen:*")
    assert 2 * 86_400 < redis_client.ttl(key) <= 3 * 86_400


def test_another_event_is_queued_and_a_body_without_an_event_id_is_never_a_repeat(
    client: FlaskClient, redis_client: redis.Redis
) -> None:
    one = body_of(envelope("redemption.failed", {}, event_id="ev_one"))
    two = body_of(envelope("redemption.failed", {}, event_id="ev_two"))
    assert post(client, one).get_json() != post(client, two).get_json()
    for _ in range(2):
        assert post(client, b"[1]").status_code == 202  # no id: each one queued
    assert redis_client.llen(DELIVERY_QUEUE) == 4


# --- 413 ----------------------------------------------------------------------------------

LIMIT = 1000


@pytest.fixture
def small_limit_app(make_settings: Callable[..., Settings]) -> Flask:
    return create_app(make_settings(MAX_BODY_BYTES=str(LIMIT)))


def object_of_size(size: int) -> bytes:
    body = b'{"pad":"' + b"x" * (size - 10) + b'"}'
    assert len(body) == size
    return body


def test_body_at_the_limit_is_accepted(small_limit_app: Flask, redis_client: redis.Redis) -> None:
    response = post(small_limit_app.test_client(), object_of_size(LIMIT))
    assert response.status_code == 202
    assert redis_client.llen(DELIVERY_QUEUE) == 1


def test_body_over_the_limit_with_its_content_length_is_413(
    small_limit_app: Flask, redis_client: redis.Redis
) -> None:
    response = post(small_limit_app.test_client(), object_of_size(LIMIT + 1))
    assert response.status_code == 413
    assert redis_client.dbsize() == 0


class EndlessBody(io.RawIOBase):
    """A request body that never ends, counting what the app reads of it."""

    def __init__(self, body: bytes = b"") -> None:
        self.prefix = body
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        size = len(buffer)
        chunk = (self.prefix[self.read_bytes : self.read_bytes + size]).ljust(size, b" ")
        buffer[:size] = chunk
        self.read_bytes += size
        return size


def streamed(app: Flask, stream: io.RawIOBase, signature: str) -> tuple[str, bytes]:
    """POST ``stream`` with no Content-Length, as a server does for a chunked body."""
    environ = EnvironBuilder(
        path=WEBHOOK,
        method="POST",
        content_type="application/json",
        headers={"x-voucherify-signature": signature},
    ).get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ["wsgi.input"] = stream
    environ["wsgi.input_terminated"] = True  # what gunicorn sets for a chunked body
    app_iter, status, _ = run_wsgi_app(app, environ, buffered=True)
    return status, b"".join(app_iter)


def test_endless_body_without_content_length_is_413_after_reading_at_most_the_limit(
    small_limit_app: Flask, redis_client: redis.Redis
) -> None:
    # A valid signed object followed by an endless run of spaces: still a JSON object,
    # still signed (the whitespace-stripped form), but larger than the limit.
    body = b'{"a":1}'
    stream = EndlessBody(body)
    status, answer = streamed(small_limit_app, stream, sign(body))
    assert status.startswith("413")
    assert json.loads(answer)["error"] == "body_too_large"
    # One byte past the limit is needed to tell "more" from "exactly the limit".
    assert stream.read_bytes <= LIMIT + 1
    assert redis_client.dbsize() == 0


def test_streamed_body_at_the_limit_is_accepted(
    small_limit_app: Flask, redis_client: redis.Redis
) -> None:
    body = object_of_size(LIMIT)
    status, _ = streamed(small_limit_app, io.BytesIO(body), sign(body))  # type: ignore[arg-type]
    assert status.startswith("202")
    [message] = queued(redis_client)
    assert message["decoded_body"][1]["body"] == body.decode()


def test_streamed_body_one_byte_over_the_limit_is_413(
    small_limit_app: Flask, redis_client: redis.Redis
) -> None:
    body = object_of_size(LIMIT + 1)
    status, _ = streamed(small_limit_app, io.BytesIO(body), sign(body))  # type: ignore[arg-type]
    assert status.startswith("413")
    assert redis_client.dbsize() == 0


# --- 415 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "text/json"],
    ids=["missing", "text-plain", "form", "text-json"],
)
def test_non_json_content_type_is_415(
    client: FlaskClient, redis_client: redis.Redis, content_type: str | None
) -> None:
    response = post(client, b'{"a":1}', content_type=content_type)
    assert response.status_code == 415
    assert redis_client.dbsize() == 0


# --- 503 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", ["1", None], ids=["budget-1s", "default-budget"])
def test_unreachable_redis_is_503_with_retry_after_within_the_budget(
    make_settings: Callable[..., Settings], budget: str | None
) -> None:
    settings = make_settings(
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", ENQUEUE_TIMEOUT_SECONDS=budget
    )
    client = create_app(settings).test_client()
    started = time.monotonic()
    response = post(client, redemption_body())
    elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) > 0
    assert set(response.get_json()) == {"error"}
    # The contract's bound (the one timed assertion of the suite): the sender must get an
    # answer, and retry, well within its 10 s timeout.
    assert elapsed <= settings.enqueue_timeout_seconds + 3


# --- health, readiness, metrics -----------------------------------------------------------


def test_healthz(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200


def test_readyz_with_both_servers_up(client: FlaskClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json()["status"] == "ready"


@pytest.mark.parametrize("down", ["redis", "postgres"])
def test_readyz_names_the_server_that_does_not_answer(
    make_settings: Callable[..., Settings], down: str
) -> None:
    closed = free_port()
    if down == "redis":
        settings = make_settings(REDIS_URL=f"redis://127.0.0.1:{closed}/0")
    else:
        settings = make_settings(DATABASE_URL=f"postgresql://postgres@127.0.0.1:{closed}/x")
    response = create_app(settings).test_client().get("/readyz")
    assert response.status_code == 503
    failed = response.get_json()["failed"]
    assert list(failed) == [down]


def test_metrics_is_prometheus_text_counting_answers(client: FlaskClient) -> None:
    post(client, b'{"a":1}')
    post(client, b'{"a":1}', signature="0" * 64)
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    text = response.get_data(as_text=True)
    assert "receiver_requests_total" in text
    samples = {
        (sample.name, sample.labels.get("code")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("path") == WEBHOOK
    }
    assert samples[("receiver_requests_total", "202")] >= 1
    assert samples[("receiver_requests_total", "401")] >= 1
