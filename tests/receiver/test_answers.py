"""Every answer of the Receiver table in docs/contract.md, as the web process's Flask app
gives it (``create_app``, the WSGI callable gunicorn serves): the status line, headers and
bytes, and what lands in Redis (a real server): one message and one accepted id for a
202, nothing for any other answer."""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import redis
from flask import Flask
from werkzeug.test import EnvironBuilder, run_wsgi_app

from config.settings import Settings
from devtools.servers import free_port
from devtools.webhooks import SECRET, body_of, envelope, fixture, sign
from web.app import create_app
from workers.queue import ACCEPTED_HASH, DELIVERY_QUEUE

WEBHOOK = "/webhooks/voucherify"
LIMIT = 8000  # above the published redemption (4.2 KB)
DELIVERY_ID = re.compile(rb'"delivery_id":"[0-9a-f]{32}"')

Answer = tuple[str, list[tuple[str, str]], bytes]


def redemption() -> bytes:
    return body_of(envelope("redemption.succeeded", fixture("redemption.succeeded")))


def request(
    body: bytes,
    signature: str | None = "sign",
    content_type: str | None = "application/json",
    *,
    chunked: bool = False,
    declared: int | None = None,
    method: str = "POST",
) -> Callable[[], dict[str, Any]]:
    """A fresh WSGI environ each call (its input stream is read once)."""

    def build() -> dict[str, Any]:
        headers = {}
        if signature is not None:
            headers["x-voucherify-signature"] = sign(body) if signature == "sign" else signature
        environ = EnvironBuilder(
            path=WEBHOOK, method=method, headers=headers, content_type=content_type
        ).get_environ()
        environ["wsgi.input"] = io.BytesIO(body)
        if chunked:  # as gunicorn gives a chunked body: no length, the stream terminated
            environ.pop("CONTENT_LENGTH", None)
            environ["wsgi.input_terminated"] = True
        else:
            environ["CONTENT_LENGTH"] = str(len(body) if declared is None else declared)
        return environ

    return build


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    "202": request(redemption()),
    "202-chunked": request(redemption(), chunked=True),
    "202-content-type-parameters": request(b'{"a":1}', content_type="Application/JSON; x=1"),
    "202-vendor-json": request(b'{"a":1}', content_type="application/vnd.voucherify+json"),
    "202-at-the-limit": request(b'{"pad":"' + b"x" * (LIMIT - 10) + b'"}'),
    "415-text": request(b'{"a":1}', content_type="text/plain"),
    "415-missing": request(b'{"a":1}', content_type=None),
    "413-declared": request(b'{"a":1}', declared=LIMIT + 1),
    "413-chunked": request(b'{"pad":"' + b"x" * LIMIT + b'"}', chunked=True),
    "401-missing": request(b'{"a":1}', signature=None),
    "401-malformed": request(b'{"a":1}', signature="sha256=abc"),
    "401-wrong": request(b'{"a":1}', signature="0" * 64),
    "202-array": request(b"[1,2]"),
    "202-not-json": request(b'{"a":'),
    "202-nan": request(b'{"a":NaN}'),
    "202-too-deep": request(b'{"a":' + b"[" * 100 + b"]" * 100 + b"}"),
    "202-not-utf8": request(b'{"a":"\xff"}'),
    "400-client-gone": request(b'{"a":1}', declared=500),  # 7 bytes of 500 arrive
    "405-get": request(b"", method="GET"),
}


@pytest.fixture
def app(settings: Settings) -> Flask:
    return create_app(Settings.from_env({**environment(settings), "MAX_BODY_BYTES": str(LIMIT)}))


def environment(settings: Settings) -> dict[str, str]:
    return {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "VOUCHERIFY_WEBHOOK_SECRET": SECRET,
    }


def served(wsgi: Callable[..., Iterable[bytes]], environ: dict[str, Any]) -> Answer:
    app_iter, status, headers = run_wsgi_app(wsgi, environ, buffered=True)
    body = b"".join(app_iter)
    return status, list(headers.items()), DELIVERY_ID.sub(b'"delivery_id":"<id>"', body)


@pytest.mark.parametrize("case", list(CASES))
def test_each_case_gets_its_answer_and_only_a_202_enqueues(
    app: Flask, redis_client: redis.Redis, case: str
) -> None:
    status, headers, _ = served(app, CASES[case]())

    expected = int(case.split("-")[0])
    assert status.startswith(f"{expected} ")
    queued = redis_client.llen(DELIVERY_QUEUE)
    assert queued == (1 if expected == 202 else 0)
    assert redis_client.hlen(ACCEPTED_HASH) == queued
    if expected not in (400, 405):  # Werkzeug's own pages: nobody is left to read a 400
        assert ("Content-Type", "application/json") in headers


def test_a_broker_it_cannot_reach_is_a_503_with_retry_after(settings: Settings) -> None:
    down = {
        **environment(settings),
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "ENQUEUE_TIMEOUT_SECONDS": "0.2",
    }
    status, headers, body = served(create_app(Settings.from_env(down)), CASES["202"]())
    assert status == "503 SERVICE UNAVAILABLE"
    assert dict(headers)["Retry-After"] == "30"
    assert body == b'{"error":"broker_unavailable"}'


def test_the_answers_are_the_contracts_bytes(app: Flask) -> None:
    status, headers, body = served(app, CASES["202"]())
    assert status == "202 ACCEPTED"
    assert headers == [("Content-Type", "application/json"), ("Content-Length", "70")]
    assert body == b'{"status":"accepted","delivery_id":"<id>"}'
    status, headers, body = served(app, CASES["413-declared"]())
    assert status == "413 REQUEST ENTITY TOO LARGE"
    assert body == b'{"error":"body_too_large","limit":8000}'


def test_an_unexpected_error_is_a_500_never_a_2xx_and_is_logged(
    app: Flask,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def fail(*_: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr("workers.queue.DeliveryPublisher.publish", fail)
    status, _, _ = served(app, CASES["202"]())
    assert status == "500 INTERNAL SERVER ERROR"
    assert any(record.exc_info and "a bug" in str(record.exc_info[1]) for record in caplog.records)
    assert redis_client.dbsize() == 0


def test_other_routes_and_methods_go_to_flask(app: Flask) -> None:
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    response = client.get(WEBHOOK)
    assert response.status_code == 405
    assert "POST" in response.headers["Allow"]
    assert client.post(WEBHOOK + "/").status_code == 404
