"""The buffering gthread worker: when a request has arrived whole (pure), and the gunicorn
internals it leans on (fails when one of them moves)."""

from __future__ import annotations

import inspect

import pytest
from gunicorn.http import unreader
from gunicorn.workers import gthread

from compat.gunicorn_gthread import MAX_HEAD_BYTES, BufferingThreadWorker, arrived

LIMIT = 1000
HEAD = b"POST /webhooks/voucherify HTTP/1.1\r\nHost: x\r\n"


def request(*headers: bytes, body: bytes = b"") -> bytes:
    return HEAD + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


@pytest.mark.parametrize(
    ("data", "whole"),
    [
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n", False),  # the head has not ended
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", True),  # no body
        (request(b"Content-Length: 5", body=b"{}"), False),
        (request(b"content-length: 5", body=b'{"a":'), True),
        (request(b"Content-Length: 5", body=b'{"a":1}'), True),  # more is the parser's
        (request(b"Content-Length: 1001"), True),  # over the limit: 413 unread
        (request(b"Content-Length: five"), True),  # malformed: the parser's 400
        (request(b"Transfer-Encoding: chunked", body=b"2\r\n{}\r\n"), False),
        (request(b"Transfer-Encoding: chunked", body=b"2\r\n{}\r\n0\r\n\r\n"), True),
        (request(b"Transfer-Encoding: chunked", body=b"2;x=1\r\n{}\r\n0\r\n"), False),
        (request(b"Transfer-Encoding: chunked", body=b"zz\r\n"), True),  # malformed
        (request(b"Transfer-Encoding: chunked", body=b"f" * (LIMIT + 1)), True),  # too long
        (request(b"Transfer-Encoding: gzip"), True),  # not ours to frame
        (b"X" * (MAX_HEAD_BYTES + 1), True),  # a head that never ends: the parser refuses
    ],
)
def test_a_request_is_handed_to_a_thread_once_whole_or_answerable(data: bytes, whole: bool) -> None:
    assert arrived(data, LIMIT)[0] is whole


def test_an_expect_continue_request_waits_for_its_body_and_is_told_to_send_it() -> None:
    data = request(b"Content-Length: 5", b"Expect: 100-continue")
    assert arrived(data, LIMIT) == (False, True)
    assert arrived(data + b"12345", LIMIT) == (True, True)


def test_the_gthread_internals_it_relies_on_are_still_there() -> None:
    for name in ("enqueue_req", "handle", "murder_pending", "accept", "finish_request"):
        assert callable(getattr(gthread.ThreadWorker, name)), name
    # Every new connection and every kept-alive request goes through enqueue_req.
    assert "self.enqueue_req(conn)" in inspect.getsource(gthread.ThreadWorker.accept)
    readable = inspect.getsource(gthread.ThreadWorker.on_client_socket_readable)
    assert "self.enqueue_req(conn)" in readable
    run = inspect.getsource(gthread.ThreadWorker.run)
    assert "self.murder_pending()" in run
    assert "self.poller" in run
    handle = inspect.getsource(gthread.ThreadWorker.handle)
    assert "conn.data_ready" in handle
    assert "conn.init()" in handle
    assert "next(conn.parser)" in handle
    init = inspect.getsource(gthread.TConn.init)
    assert "self.initialized" in init
    assert "self.parser" in init
    assert callable(unreader.Unreader.unread)
    assert callable(unreader.Unreader.take_buffered)
    assert issubclass(BufferingThreadWorker, gthread.ThreadWorker)
