"""Slow clients cannot stall intake: the web process (gunicorn, as the Procfile runs it)
reads each request whole in its main loop before a thread takes it
(compat/gunicorn_gthread.py)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import redis

from devtools.webhooks import SECRET, body_of, card_redemption, envelope
from tests.conftest import Processes, post_signed, process_env
from workers.queue import DELIVERY_QUEUE

TRICKLERS = 64
WEBHOOKS = 5
STALLED = 32
MAX_BODY = 65_536
TRICKLE_HEAD = (
    b"POST /webhooks/voucherify HTTP/1.1\r\n"
    b"Host: localhost\r\n"
    b"Content-Type: application/json\r\n"
    b"x-voucherify-signature: " + b"0" * 64 + b"\r\n"
    b"Content-Length: 5000\r\n\r\n"
)


@pytest.fixture(params=["1", "2"], ids=["1x8-threads", "2x8-threads"])
def web_port(
    request: pytest.FixtureRequest,
    processes: Processes,
    database_url: str,
    redis_url: str,
    tmp_path: Path,
) -> int:
    env = process_env(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        VOUCHERIFY_WEBHOOK_SECRET=SECRET,
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
        WEB_CONCURRENCY=request.param,  # the default is 2 processes x 8 threads
        WEB_THREADS="8",
        WEB_REQUEST_TIMEOUT_SECONDS="3",
        MAX_BODY_BYTES=str(MAX_BODY),
    )
    (tmp_path / "metrics").mkdir()
    _, port = processes.web(env)
    return port


class Tricklers:
    """Connections that send a request head, then one body byte every ``every`` seconds."""

    def __init__(self, port: int, count: int, every: float = 0.5) -> None:
        self.sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
        for sock in self.sockets:
            sock.sendall(TRICKLE_HEAD)
        self.every = every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self) -> None:
        while not self.stop.wait(self.every):
            for sock in self.sockets:
                with contextlib.suppress(OSError):  # dropped by the server: as it should
                    sock.send(b" ")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        for sock in self.sockets:
            sock.close()


def post_webhook(port: int, timeout: float, n: int = 0) -> int:
    data = card_redemption("gift", f"r_slow_{n}", 100, 900)
    body = body_of(envelope("redemption.succeeded", data, event_id=f"ev_slow_{n}"))
    response, raw = post_signed(port, body, timeout)
    json.loads(raw)
    return response.status


def webhooks_get_their_202_at_once(
    port: int, redis_client: redis.Redis, processes: Processes
) -> None:
    """``WEBHOOKS`` webhooks, on new connections: each answered 202 within a second (whichever
    process accepts one must answer it), all of them queued."""
    for n in range(WEBHOOKS):
        assert post_webhook(port, timeout=1.0, n=n) == 202, processes.logs()
    assert redis_client.llen(DELIVERY_QUEUE) == WEBHOOKS


@pytest.mark.e2e
def test_a_webhook_gets_its_202_while_64_clients_trickle_their_requests(
    web_port: int, redis_client: redis.Redis, processes: Processes
) -> None:
    tricklers = Tricklers(web_port, TRICKLERS)
    try:
        time.sleep(1.0)  # every trickler is past its head and holding on
        # Each within a second, though 64 connections trickle (more than 2 x 8 threads).
        webhooks_get_their_202_at_once(web_port, redis_client, processes)
    finally:
        tricklers.close()


CHUNKED_HEAD = (
    b"POST /webhooks/voucherify HTTP/1.1\r\n"
    b"Host: localhost\r\n"
    b"Content-Type: application/json\r\n"
    b"x-voucherify-signature: " + b"0" * 64 + b"\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def stalled_chunked(port: int) -> socket.socket:
    """A chunked request of more framing than MAX_BODY_BYTES (7,000 chunks of 5 bytes:
    70 KB sent, 35 KB of body), then nothing: no last chunk ever comes."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(CHUNKED_HEAD + b"5\r\n{}{}{\r\n" * 7_000)
    return sock


@pytest.mark.e2e
def test_webhooks_get_their_202_while_32_chunked_clients_stall_past_the_limit_of_framing(
    web_port: int, redis_client: redis.Redis, processes: Processes
) -> None:
    # Counted by raw bytes, such a request looked whole and went to a thread that then
    # blocked on the socket with no timeout: 16 of them stopped intake for everyone.
    stalled = [stalled_chunked(web_port) for _ in range(STALLED)]
    try:
        time.sleep(0.5)  # all of it sent and read by the servers
        webhooks_get_their_202_at_once(web_port, redis_client, processes)
    finally:
        for sock in stalled:
            sock.close()


@pytest.mark.e2e
def test_a_chunked_body_of_too_many_chunks_is_refused_by_the_loop(
    web_port: int, processes: Processes
) -> None:
    sock = socket.create_connection(("127.0.0.1", web_port))
    sock.settimeout(10)
    try:
        with contextlib.suppress(OSError):  # the server may close while we still send
            sock.sendall(CHUNKED_HEAD + b"1\r\nx\r\n" * 12_000)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(4096):
                answer += chunk
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 400 "), (answer[:200], processes.logs())
    assert b"chunked_framing" in answer


@pytest.mark.e2e
def test_a_request_that_takes_too_long_to_arrive_is_answered_408_and_closed(
    web_port: int, processes: Processes
) -> None:
    tricklers = Tricklers(web_port, 1)
    sock = tricklers.sockets[0]
    sock.settimeout(10)
    started = time.monotonic()
    try:
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    finally:
        tricklers.close()
    assert answer.startswith(b"HTTP/1.1 408 "), (answer, processes.logs())
    # WEB_REQUEST_TIMEOUT_SECONDS=3, checked once a second by the main loop.
    assert time.monotonic() - started < 8


@pytest.mark.e2e
def test_unfinished_bodies_past_64_of_the_largest_in_a_process_are_refused_503(
    web_port: int, redis_client: redis.Redis, processes: Processes
) -> None:
    head = TRICKLE_HEAD.replace(b"Content-Length: 5000", b"Content-Length: %d" % MAX_BODY)
    holders = []
    answers = []
    try:
        for _ in range(140):  # 140 x 64 KB: past 64 x 64 KiB in every process
            sock = socket.create_connection(("127.0.0.1", web_port))
            with contextlib.suppress(OSError):
                sock.sendall(head + b"x" * (MAX_BODY - 100))
            holders.append(sock)
        time.sleep(0.5)
        for sock in holders:
            sock.settimeout(0.05)
            with contextlib.suppress(OSError):
                answers.append(sock.recv(200))
        # Some refused at once, so the process's memory stays bounded; intake goes on.
        assert any(a.startswith(b"HTTP/1.1 503 ") for a in answers), processes.logs()
        assert post_webhook(web_port, timeout=1.0) == 202
    finally:
        for sock in holders:
            sock.close()
