"""A sender that POSTs a stream of signed deliveries and retries like Voucherify.

``Sender`` POSTs the stream (``devtools.stream``) from a pool of threads over keep-alive
connections, optionally paced to a rate, and records every attempt (send time, status,
ack latency, delivery id). A delivery answered 503, 5xx or not answered at all
(connection refused or dropped) is sent again after a short pause, as Voucherify
retries; a 202 is never sent again; a 4xx is final (every body here is signed and valid,
so a 4xx is a failure of the run).

Given several web processes (``set_ports``), the sender spreads the requests over them as
a round-robin load balancer does: the first attempt of delivery ``i`` goes to port
``i mod n``, each retry to the next one, so a delivery a web did not answer (it was
stopping) is sent again to another, and a duplicate may reach a different web than the
first copy.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from devtools.stream import Delivery

WEBHOOK_PATH = "/webhooks/voucherify"
CONNECTION_ERROR = 0
"""``Attempt.status`` of a request that got no HTTP answer (refused, reset, timed out)."""


@dataclass(frozen=True, slots=True)
class Attempt:
    index: int
    """The delivery's position in the stream."""
    attempt: int
    sent_at: float
    """Seconds since the sender started (monotonic clock)."""
    ack_ms: float
    status: int
    """HTTP status, or ``CONNECTION_ERROR`` (0) when no answer came."""
    delivery_id: str | None = None
    error: str | None = None
    port: int | None = None
    """The web process it was sent to."""


@dataclass
class Outcome:
    """How each delivery ended: its last attempt, and whether it was given up."""

    final: dict[int, Attempt] = field(default_factory=dict)
    abandoned: list[int] = field(default_factory=list)


class Sender:
    """POST a stream from ``threads`` threads, each with its own keep-alive connection.

    ``rate`` (deliveries per second) paces the first attempts; None sends as fast as the
    threads go (a closed loop: ``threads`` requests in flight). ``set_port`` moves the
    sender to another web process, as a load balancer would; ``set_ports`` spreads it over
    several (see the module's docstring).
    """

    def __init__(
        self,
        deliveries: list[Delivery],
        port: int,
        threads: int = 16,
        rate: float | None = None,
        retry_pause: float = 0.5,
        timeout: float = 15.0,
        max_attempts: int = 100,
        host: str = "127.0.0.1",
    ) -> None:
        self.deliveries = deliveries
        self.host = host
        self._ports: tuple[int, ...] = (port,)
        self.threads = threads
        self.rate = rate
        self.retry_pause = retry_pause
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.attempts: list[Attempt] = []
        self.outcome = Outcome()
        self.started_at = 0.0
        """time.monotonic() at start."""
        self.started_wall = 0.0
        """time.time() at start, to line the records up with the database's timestamps."""
        self.finished_at: float | None = None
        self._lock = threading.Lock()
        self._next = 0
        self._done = 0
        self._workers: list[threading.Thread] = []
        self._stop = threading.Event()

    # -- control ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._ports[0]

    @property
    def ports(self) -> tuple[int, ...]:
        return self._ports

    def set_port(self, port: int) -> None:
        self._ports = (port,)

    def set_ports(self, ports: Sequence[int]) -> None:
        if not ports:
            raise ValueError("the sender needs at least one port")
        self._ports = tuple(ports)

    def route(self, delivery: Delivery, attempt: int) -> int:
        """The port of ``delivery``'s ``attempt`` (1, 2, ...): round robin over the ports."""
        ports = self._ports
        return ports[(delivery.index + attempt - 1) % len(ports)]

    @property
    def taken(self) -> int:
        """Deliveries whose first attempt has started (or is due)."""
        return self._next

    @property
    def done(self) -> int:
        """Deliveries finished (202, final 4xx or abandoned)."""
        return self._done

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    def start(self) -> None:
        self.started_wall = time.time()
        self.started_at = time.monotonic()
        for i in range(self.threads):
            thread = threading.Thread(target=self._run, name=f"sender-{i}", daemon=True)
            thread.start()
            self._workers.append(thread)

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for thread in self._workers:
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = any(t.is_alive() for t in self._workers)
        if alive:
            self._stop.set()
        return not alive

    def run(self, timeout: float) -> bool:
        self.start()
        return self.join(timeout)

    # -- the threads -----------------------------------------------------------------

    def _take(self) -> int | None:
        with self._lock:
            if self._next >= len(self.deliveries):
                return None
            index = self._next
            self._next += 1
            return index

    def _run(self) -> None:
        conns: dict[int, http.client.HTTPConnection] = {}  # one keep-alive per web
        while not self._stop.is_set():
            index = self._take()
            if index is None:
                break
            if self.rate:
                due = self.started_at + index / self.rate
                pause = due - time.monotonic()
                if pause > 0:
                    self._stop.wait(pause)  # pacing the offered load
            delivery = self.deliveries[index]
            final: Attempt | None = None
            for number in range(1, self.max_attempts + 1):
                port = self.route(delivery, number)
                conn = conns.get(port)
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, port, timeout=self.timeout)
                    conns[port] = conn
                attempt, keep = self._post(conn, port, delivery, number)
                if not keep:
                    conns.pop(port).close()
                with self._lock:
                    self.attempts.append(attempt)
                if attempt.status == 202 or 400 <= attempt.status < 500:
                    final = attempt
                    break
                if self._stop.is_set():
                    break
                # No answer, 503 or another 5xx: Voucherify tries again later.
                jitter = random.uniform(0.5, 1.5)  # noqa: S311 - jitter, not crypto
                self._stop.wait(self.retry_pause * jitter)
            with self._lock:
                if final is None:
                    self.outcome.abandoned.append(index)
                else:
                    self.outcome.final[index] = final
                self._done += 1
                if self._done == len(self.deliveries):
                    self.finished_at = self.elapsed()
            for gone in set(conns) - set(self._ports):  # a web the sender no longer uses
                conns.pop(gone).close()
        for conn in conns.values():
            conn.close()

    def _post(
        self, conn: http.client.HTTPConnection, port: int, delivery: Delivery, number: int
    ) -> tuple[Attempt, bool]:
        headers = {
            "Content-Type": "application/json",
            "x-voucherify-signature": delivery.signature,
        }
        sent = time.monotonic()
        try:
            conn.request("POST", WEBHOOK_PATH, body=delivery.body, headers=headers)
            response = conn.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as exc:
            ack_ms = (time.monotonic() - sent) * 1000
            attempt = Attempt(
                delivery.index,
                number,
                sent - self.started_at,
                ack_ms,
                CONNECTION_ERROR,
                error=type(exc).__name__,
                port=port,
            )
            return attempt, False
        ack_ms = (time.monotonic() - sent) * 1000
        delivery_id = None
        if response.status == 202:
            delivery_id = str(json.loads(payload)["delivery_id"])
        attempt = Attempt(
            delivery.index,
            number,
            sent - self.started_at,
            ack_ms,
            response.status,
            delivery_id,
            port=port,
        )
        return attempt, not response.will_close

    # -- results ---------------------------------------------------------------------

    def accepted(self) -> dict[int, Attempt]:
        """Deliveries whose final answer was 202, by index."""
        return {i: a for i, a in self.outcome.final.items() if a.status == 202}

    def status_histogram(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for attempt in self.attempts:
            label = (
                f"no answer ({attempt.error})"
                if attempt.status == CONNECTION_ERROR
                else str(attempt.status)
            )
            counts[label] += 1
        return dict(sorted(counts.items()))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]
