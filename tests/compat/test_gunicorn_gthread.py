"""The buffering gthread worker: when a request has arrived whole (pure), and the gunicorn
internals it leans on (fails when one of them moves)."""

from __future__ import annotations

import inspect

import pytest
from gunicorn.http import unreader
from gunicorn.workers import gthread

from compat.gunicorn_gthread import (
    MAX_CHUNKS,
    MAX_HEAD_BYTES,
    READY,
    REFUSE,
    WAIT,
    Arrival,
    BufferingThreadWorker,
    arrived,
)

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
        # Framing is not body: 300 one-byte chunks are 1,800 bytes sent, 300 of body.
        (request(b"Transfer-Encoding: chunked", body=b"1\r\nx\r\n" * 300), False),
        (request(b"Transfer-Encoding: chunked", body=b"1\r\nx\r\n" * 300 + b"0\r\n\r\n"), True),
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


def test_a_chunked_body_is_parsed_once_however_many_pieces_it_comes_in() -> None:
    arrival = Arrival(deadline=0.0)
    arrival.data += request(b"Transfer-Encoding: chunked")
    assert arrival.progress(LIMIT) == WAIT
    for n in range(1, 101):
        arrival.data += b"3\r\nabc\r\n"
        assert arrival.progress(LIMIT) == WAIT
        # Where the next size line starts moves on with each piece: nothing read twice.
        assert (arrival.chunks, arrival.body, arrival.position) == (n, 3 * n, len(arrival.data))
    arrival.data += b"0\r\n\r\n"
    assert arrival.progress(LIMIT) == READY


def test_a_chunk_split_across_pieces_is_read_from_where_it_stopped() -> None:
    arrival = Arrival(deadline=0.0)
    arrival.data += request(b"Transfer-Encoding: chunked") + b"a\r\n01234"
    assert arrival.progress(LIMIT) == WAIT
    arrival.data += b"56789\r\n0\r\n\r\n"
    assert arrival.progress(LIMIT) == READY
    assert arrival.body == 10


def test_more_chunks_than_any_client_sends_are_refused() -> None:
    data = request(b"Transfer-Encoding: chunked", body=b"1\r\nx\r\n" * (MAX_CHUNKS + 1))
    assert Arrival(deadline=0.0, data=bytearray(data)).progress(10 * MAX_CHUNKS) == REFUSE


def test_a_chunked_body_past_the_limit_goes_to_the_app_once_limit_plus_one_bytes_came() -> None:
    arrival = Arrival(deadline=0.0)
    arrival.data += request(b"Transfer-Encoding: chunked") + b"%x\r\n" % (LIMIT * 2)
    assert arrival.progress(LIMIT) == WAIT  # the app would wait on a read: not yet
    arrival.data += b"x" * (LIMIT + 1)
    assert arrival.progress(LIMIT) == READY  # it reads LIMIT + 1 bytes and answers 413
