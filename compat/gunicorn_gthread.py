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

A chunked body is measured by its body bytes, not its framing (262 KB of one-byte chunks
is 44 KB of body: counted by raw bytes it looked whole, and its thread then blocked on the
socket), and parsed once, from where the last piece stopped (``Arrival``); more than
``MAX_CHUNKS`` chunks is answered 400 by the loop itself. The unfinished requests of one
process hold at most ``MAX_BUFFERED_BODIES`` bodies of the largest size: the connection
that would go past is answered 503. A thread reads a handed-over request with a socket
timeout (what is left of its deadline, at least 1 s), never blocking for ever.

Measured against waitress (which buffers whole requests by design) only on paper this
round: it serves a WSGI app with its own thread pool and no multi-process mode, so the
Procfile's processes, the Prometheus multi-process setup and the graceful-reload figures
would all change with it; the measurement is left in the notes of issue 22.

The gunicorn internals this relies on (``tests/compat/`` checks them): ``ThreadWorker``'s
``enqueue_req`` (every connection and every kept-alive request passes through it),
``handle``, ``murder_pending`` (called by the main loop every second), ``poller`` and
``nr_conns``; ``TConn``'s ``sock``, ``init()``, ``parser``, ``data_ready``; and the
parser's ``unreader.unread`` / ``take_buffered``. TLS sockets (``cfg.is_ssl``) are left
to gthread as it is: TLS is terminated by the platform's router in front of us.

Checked on gunicorn 27.0.1 (pinned ``>=27.0,<27.1``). Upstream: benoitc/gunicorn#3518
(closed) and #3519 (merged in 26: a thread waits 5 s for a request's first bytes, then
hands it back; a client trickling the rest still holds the thread, what this fixes);
#2222 (closed: the maintainer's answer is a buffering proxy).
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
MAX_CHUNKS = 10_000
"""Chunks of one body past which the loop refuses it (a real client sends kilobytes each:
a 1 MiB body in one-byte chunks would be 6 MiB of framing)."""
MAX_BUFFERED_BODIES = 64
"""Unfinished requests of the largest body one process buffers at most (64 MiB at the
default 1 MiB ``MAX_BODY_BYTES``); the connection that would go past is answered 503, so a
flood of large slow bodies cannot take the process's memory."""
READ_SIZE = 64 * 1024
TIMEOUT_ANSWER = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
FRAMING_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Type: application/json\r\n"
    b'Content-Length: 29\r\n\r\n{"error":"chunked_framing"}\r\n'
)
BUSY_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 5\r\n"
    b"Content-Length: 0\r\n\r\n"
)

WAIT, READY, REFUSE = "wait", "ready", "refuse"
"""What the loop does with a request being read: keep reading; hand it to a thread (whole,
or answerable unread by the app or gunicorn's parser); answer it 400 itself and close."""


@dataclass
class Arrival:
    """A request being read by the main loop, and how far its bytes have been parsed:
    each byte is looked at once, however many pieces it comes in."""

    deadline: float
    data: bytearray = field(default_factory=bytearray)
    continued: bool = False
    head_end: int = -1
    """Where the blank line after the head starts, once it came."""
    scanned: int = 0
    """How far the head was searched for its end."""
    length: int | None = None
    """Content-Length of a framed body; None: chunked, or no body."""
    chunked: bool = False
    expects: bool = False
    verdict: str = WAIT
    """Set for good once the head alone decides (no body, malformed, too large)."""
    position: int = 0
    """Chunked: where the next chunk-size line starts."""
    body: int = 0
    """Chunked: body bytes the chunk sizes announced so far (not the framing)."""
    chunks: int = 0

    def progress(self, max_body: int) -> str:
        """``WAIT``, ``READY`` or ``REFUSE`` now that ``data`` grew."""
        if self.verdict != WAIT:
            return self.verdict
        if self.head_end < 0:
            if not self._head(max_body):
                return READY if len(self.data) > MAX_HEAD_BYTES else WAIT
            if self.verdict != WAIT:
                return self.verdict
        start = self.head_end + 4
        if not self.chunked:
            assert self.length is not None
            return READY if len(self.data) - start >= self.length else WAIT
        return self._chunks(max_body)

    def _head(self, max_body: int) -> bool:
        """Look for the head's end in the new bytes; read the head once it came."""
        end = self.data.find(b"\r\n\r\n", max(0, self.scanned - 3))
        self.scanned = len(self.data)
        if end < 0:
            return False
        self.head_end = end
        self.position = end + 4
        length: bytes | None = None
        for line in bytes(self.data[:end]).split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                self.chunked = value.endswith(b"chunked")
                if not self.chunked:
                    self.verdict = READY  # not one we frame: the parser decides
            elif name == b"expect":
                self.expects = value == b"100-continue"
        if self.chunked or self.verdict != WAIT:
            return True
        if length is None:
            self.verdict = READY  # no body
        elif not length.isdigit() or int(length) > max_body:
            self.verdict = READY  # malformed (400) or too large (413): answered unread
        else:
            self.length = int(length)
        return True

    def _chunks(self, max_body: int) -> str:
        """Read the chunk-size lines that came since the last time (each once)."""
        data = self.data
        while True:
            line_end = data.find(b"\r\n", self.position)
            if line_end < 0:
                if len(data) - self.position > 256:  # no size line is that long
                    self.verdict = READY  # the parser answers 400
                    return READY
                return WAIT
            size_text = bytes(data[self.position : line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                self.verdict = READY  # the parser answers 400
                return READY
            if size == 0:
                # Trailers (rare) end with an empty line; without them the line ends here.
                return READY if data.find(b"\r\n", line_end + 2) >= 0 else WAIT
            if self.chunks >= MAX_CHUNKS:
                self.verdict = REFUSE
                return REFUSE
            if self.body + size > max_body:
                # Too large: the app reads max_body + 1 bytes of body and answers 413;
                # hand it over once those have arrived, so its thread never waits.
                needed = line_end + 2 + (max_body + 1 - self.body)
                return READY if len(data) >= needed else WAIT
            following = line_end + 2 + size + 2
            if following > len(data):
                return WAIT  # this chunk's data is still arriving: parse from here again
            self.chunks += 1
            self.body += size
            self.position = following


def arrived(data: bytes | bytearray, max_body: int) -> tuple[bool, bool]:
    """(whether a thread should take the request now, whether it waits on a 100 Continue),
    for ``data`` read in one piece."""
    arrival = Arrival(deadline=0.0, data=bytearray(data))
    verdict = arrival.progress(max_body)
    return verdict != WAIT, arrival.expects and arrival.verdict == WAIT


class BufferingThreadWorker(ThreadWorker):  # type: ignore[misc]  # gunicorn is untyped
    """gthread whose threads only ever take requests that have fully arrived."""

    request_timeout = 10.0
    """Seconds a request may take to arrive; set by ``configure`` in the master."""
    max_body = 1_048_576
    max_buffered = MAX_BUFFERED_BODIES * 1_048_576

    @classmethod
    def configure(cls, request_timeout: float, max_body: int) -> None:
        """Called in gunicorn's configuration file, before the worker processes fork."""
        cls.request_timeout = request_timeout
        cls.max_body = max_body
        cls.max_buffered = MAX_BUFFERED_BODIES * max_body

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arriving: deque[Any] = deque()
        self.buffered_bytes = 0
        """Bytes held by the requests in ``arriving`` (bounded by ``max_buffered``)."""

    def enqueue_req(self, conn: Any) -> None:
        if self.cfg.is_ssl:
            super().enqueue_req(conn)
            return
        conn.arrival = Arrival(deadline=time.monotonic() + self.request_timeout)
        if conn.parser is not None:  # a kept-alive connection: bytes read ahead count
            conn.arrival.data += conn.parser.unreader.take_buffered()
        verdict = self._verdict(conn)
        if verdict == READY:
            self._hand_over(conn)
            return
        conn.sock.setblocking(False)
        self.arriving.append(conn)
        self.buffered_bytes += len(conn.arrival.data)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))
        if verdict == REFUSE:
            self._answer_and_drop(conn, FRAMING_ANSWER)

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
        if self.buffered_bytes + len(data) > self.max_buffered:
            self._answer_and_drop(conn, BUSY_ANSWER)
            return
        conn.arrival.data += data
        self.buffered_bytes += len(data)
        verdict = self._verdict(conn)
        if verdict == READY:
            self._forget(conn)
            self._hand_over(conn)
        elif verdict == REFUSE:
            self._answer_and_drop(conn, FRAMING_ANSWER)

    def _verdict(self, conn: Any) -> str:
        """What to do with the request now (sends a 100 Continue if it is asked for)."""
        arrival: Arrival = conn.arrival
        if not arrival.data:
            return WAIT
        verdict = arrival.progress(self.max_body)
        if arrival.expects and verdict == WAIT and not arrival.continued:
            arrival.continued = True
            with contextlib.suppress(OSError):  # then it times out or goes away
                conn.sock.send(CONTINUE)
        return verdict

    def _hand_over(self, conn: Any) -> None:
        conn.buffered = bytes(conn.arrival.data)
        conn.data_ready = True
        super().enqueue_req(conn)

    def handle(self, conn: Any) -> Any:
        buffered = conn.__dict__.pop("buffered", b"")
        if buffered:
            # Blocking again, but never for ever: a request handed over before its body
            # came (answerable unread) cannot hold the thread past its deadline.
            conn.sock.settimeout(max(1.0, conn.arrival.deadline - time.monotonic()))
            conn.init()  # gunicorn's parser, reading from the socket after our bytes
            conn.parser.unreader.unread(buffered)
        return super().handle(conn)

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        for conn in [c for c in self.arriving if c.arrival.deadline <= now]:
            self._answer_and_drop(conn, TIMEOUT_ANSWER)

    def _answer_and_drop(self, conn: Any, answer: bytes) -> None:
        with contextlib.suppress(OSError):
            conn.sock.send(answer)
        self._drop(conn)

    def _forget(self, conn: Any) -> None:
        self.arriving.remove(conn)
        self.buffered_bytes -= len(conn.arrival.data)
        self.poller.unregister(conn.sock)

    def _drop(self, conn: Any) -> None:
        self._forget(conn)
        self.nr_conns -= 1
        conn.close()
