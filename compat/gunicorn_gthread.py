"""gunicorn's gthread worker, with each request read whole by the main loop first.

Why: gthread hands a connection to a worker thread as soon as its first bytes arrive, and
the thread then blocks reading the rest. A client that trickles its request (a byte every
few seconds) holds a thread as long as it likes; 2 processes x 8 threads means 16 such
clients stop all intake, and Voucherify's webhooks wait behind them. gunicorn has no
read timeout for a request once it started.

Here the main loop (``selectors``, non-blocking) reads each request into a buffer until
it is complete: its head, and its body by ``Content-Length`` or to the last chunk. Only
then does a thread take it, with the bytes handed to gunicorn's own parser, so a thread
never waits on a client. A request that has not fully arrived ``request_timeout`` seconds
after the connection became readable is answered 408 and closed. What the app must see
to answer early is handed over at once: a declared length or a body past ``max_body``
(the app answers 413 without reading it), a head too large or malformed (gunicorn's
parser answers 400). ``Expect: 100-continue`` gets its 100 from the buffering loop (and
gunicorn may send a second one; RFC 9110 lets a client receive several).

The gunicorn internals this relies on (``tests/compat/`` checks them): ``ThreadWorker``'s
``enqueue_req`` (every connection and every kept-alive request passes through it),
``handle``, ``murder_pending`` (called by the main loop every second), ``poller`` and
``nr_conns``; ``TConn``'s ``sock``, ``init()``, ``parser``, ``data_ready``; and the
parser's ``unreader.unread`` / ``take_buffered``. TLS sockets (``cfg.is_ssl``) are left
to gthread as it is: TLS is terminated by the platform's router in front of us.
"""

from __future__ import annotations

import contextlib
import selectors
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

MAX_HEAD_BYTES = 64 * 1024
"""More head than this is not a request we serve: let gunicorn's parser refuse it."""
READ_SIZE = 64 * 1024
TIMEOUT_ANSWER = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass
class Arrival:
    """A request being read by the main loop."""

    deadline: float
    data: bytearray = field(default_factory=bytearray)
    continued: bool = False


def arrived(data: bytes | bytearray, max_body: int) -> tuple[bool, bool]:
    """(whether a thread should take the request now, whether it waits on a 100 Continue)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return len(data) > MAX_HEAD_BYTES, False
    if len(data) > end + 4 + max_body:
        return True, False  # more body than the app accepts: it answers 413
    length: bytes | None = None
    chunked = expects = False
    for line in bytes(data[:end]).split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = value
        elif name == b"transfer-encoding":
            chunked = value.endswith(b"chunked")
            if not chunked:
                return True, False  # not one we frame: the parser decides
        elif name == b"expect":
            expects = value == b"100-continue"
    if chunked:
        return _last_chunk_in(data, end + 4), expects
    if length is None:
        return True, False  # no body
    if not length.isdigit() or int(length) > max_body:
        return True, False  # malformed (400) or too large (413): answered unread
    return len(data) - (end + 4) >= int(length), expects


def _last_chunk_in(data: bytes | bytearray, start: int) -> bool:
    """Whether a chunked body starting at ``start`` is complete (malformed: hand it over)."""
    position = start
    while True:
        line_end = data.find(b"\r\n", position)
        if line_end < 0:
            return False
        size_text = bytes(data[position:line_end]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return True  # the parser answers 400
        if size == 0:
            # Trailers (rare) end with an empty line; without them the line ends here.
            return data.find(b"\r\n", line_end + 2) >= 0
        position = line_end + 2 + size + 2
        if position > len(data):
            return False


class BufferingThreadWorker(ThreadWorker):  # type: ignore[misc]  # gunicorn is untyped
    """gthread whose threads only ever take requests that have fully arrived."""

    request_timeout = 10.0
    """Seconds a request may take to arrive; set by ``configure`` in the master."""
    max_body = 262_144

    @classmethod
    def configure(cls, request_timeout: float, max_body: int) -> None:
        """Called in gunicorn's configuration file, before the worker processes fork."""
        cls.request_timeout = request_timeout
        cls.max_body = max_body

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arriving: deque[Any] = deque()

    def enqueue_req(self, conn: Any) -> None:
        if self.cfg.is_ssl:
            super().enqueue_req(conn)
            return
        conn.arrival = Arrival(deadline=time.monotonic() + self.request_timeout)
        if conn.parser is not None:  # a kept-alive connection: bytes read ahead count
            conn.arrival.data += conn.parser.unreader.take_buffered()
        if self._whole(conn):
            self._hand_over(conn)
            return
        conn.sock.setblocking(False)
        self.arriving.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _on_readable(self, conn: Any, _sock: Any) -> None:
        try:
            data = conn.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the client went away before its request was whole
            self._drop(conn)
            return
        conn.arrival.data += data
        if self._whole(conn):
            self._forget(conn)
            self._hand_over(conn)

    def _whole(self, conn: Any) -> bool:
        """Whether a thread should take the request now (sends a 100 Continue if asked)."""
        arrival: Arrival = conn.arrival
        if not arrival.data:
            return False
        ready, expects = arrived(arrival.data, self.max_body)
        if expects and not ready and not arrival.continued:
            arrival.continued = True
            with contextlib.suppress(OSError):  # then it times out or goes away
                conn.sock.send(CONTINUE)
        return ready

    def _hand_over(self, conn: Any) -> None:
        conn.buffered = bytes(conn.arrival.data)
        conn.data_ready = True
        super().enqueue_req(conn)

    def handle(self, conn: Any) -> Any:
        buffered = conn.__dict__.pop("buffered", b"")
        if buffered:
            conn.sock.setblocking(True)
            conn.init()  # gunicorn's parser, reading from the socket after our bytes
            conn.parser.unreader.unread(buffered)
        return super().handle(conn)

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        for conn in [c for c in self.arriving if c.arrival.deadline <= now]:
            with contextlib.suppress(OSError):
                conn.sock.send(TIMEOUT_ANSWER)
            self._drop(conn)

    def _forget(self, conn: Any) -> None:
        self.arriving.remove(conn)
        self.poller.unregister(conn.sock)

    def _drop(self, conn: Any) -> None:
        self._forget(conn)
        self.nr_conns -= 1
        conn.close()
