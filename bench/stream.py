"""A stream of signed deliveries as Voucherify sends them, and a sender that retries like it.

Shared by the fault suite (``tests/fault/test_under_fire.py``) and the load benchmark
(``bench/load.py``), so both measure the same mix:

- card redemption / rollback pairs built from the published payloads
  (``tests/support.py``), gift and loyalty cards in turn, each pair with its own order,
  customer-card and voucher; most pairs are rolled back, some rollbacks fail
  (``already_rolled_back`` after a rollback, ``review`` codes otherwise);
- 10 % duplicates: a body already in the stream sent again, byte for byte, a little later;
- 5 % out of order: a rollback sent before its redemption;
- the ledger effect of every event, so the expected totals per customer and kind are known
  to the unit, computed over the events whose delivery was eventually answered 202.

``Sender`` POSTs the stream from a pool of threads over keep-alive connections, optionally
paced to a rate, and records every attempt (send time, status, ack latency, delivery id).
A delivery answered 503, 5xx or not answered at all (connection refused or dropped) is
sent again after a short pause, as Voucherify retries; a 202 is never sent again; a 4xx is
final (every body here is signed and valid, so a 4xx is a failure of the run).
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from tests.support import (
    SECRET,
    body_of,
    card_redemption,
    card_rollback,
    card_rollback_failed,
    envelope,
    sign,
)

WEBHOOK_PATH = "/webhooks/voucherify"
KINDS = {"gift": "gift_credit", "loyalty": "loyalty_points"}
REVIEW_CODES = ("voucher_not_found", "order_already_canceled", "internal_error")
CONNECTION_ERROR = 0
"""``Attempt.status`` of a request that got no HTTP answer (refused, reset, timed out)."""


@dataclass(frozen=True, slots=True)
class Delivery:
    index: int
    """Position in the send order."""
    event_id: str
    type: str
    body: bytes
    signature: str
    duplicate: bool = False
    out_of_order: bool = False


@dataclass(frozen=True, slots=True)
class Effect:
    """What one event does to the ledger: ``amount`` (signed) on a customer's card kind."""

    customer_id: str
    kind: str
    amount: int
    redemption_id: str


@dataclass
class Stream:
    deliveries: list[Delivery]
    effects: dict[str, Effect]
    """Ledger effect per event id (redemptions debit, rollbacks restore)."""
    redemptions: set[str] = field(default_factory=set)
    rollbacks: set[str] = field(default_factory=set)
    rollback_failures: set[str] = field(default_factory=set)

    @property
    def event_ids(self) -> set[str]:
        return {d.event_id for d in self.deliveries}

    def mix(self) -> dict[str, int]:
        return {
            "deliveries": len(self.deliveries),
            "events": len(self.event_ids),
            "redemptions": len(self.redemptions),
            "rollbacks": len(self.rollbacks),
            "rollback_failures": len(self.rollback_failures),
            "duplicates": sum(d.duplicate for d in self.deliveries),
            "out_of_order": sum(d.out_of_order for d in self.deliveries),
        }

    def expected_totals(self, event_ids: Iterable[str]) -> dict[tuple[str, str], int]:
        """Ledger totals per (customer, kind) that exactly these events must produce."""
        totals: Counter[tuple[str, str]] = Counter()
        for event_id in set(event_ids):
            effect = self.effects.get(event_id)
            if effect is not None:
                totals[(effect.customer_id, effect.kind)] += effect.amount
        return dict(totals)


def _stamp(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_stream(
    n: int,
    seed: int = 7,
    prefix: str = "fire",
    duplicates: float = 0.10,
    out_of_order: float = 0.05,
    customers: int = 97,
) -> Stream:
    """``n`` deliveries: unique events in a natural order with some rollbacks moved early,
    then ``duplicates`` of them re-sent a little later."""
    rng = random.Random(seed)
    n_duplicates = round(n * duplicates)
    n_unique = n - n_duplicates
    base = datetime(2024, 2, 1, 8, 0, tzinfo=UTC)

    # Events per pair: a redemption; 80 % a rollback; 10 % a failed rollback.
    events: list[tuple[str, str, dict[str, object]]] = []  # (event_id, type, data)
    effects: dict[str, Effect] = {}
    pair_of_rollback: dict[str, str] = {}  # rollback event id -> redemption event id
    stream = Stream([], effects)
    pair = 0
    while len(events) < n_unique:
        kind = "gift" if pair % 2 else "loyalty"
        customer = f"cust_{prefix}_{pair % customers}"
        order_id, voucher_id = f"ord_{prefix}_{pair}", f"v_{prefix}_{pair}"
        rid = f"r_{prefix}_{pair}"
        amount = rng.randint(1, 50_000) if kind == "gift" else rng.randint(1, 5_000)
        at = base + timedelta(seconds=pair)
        redemption_id = f"ev_{prefix}_{pair}_r"
        data = card_redemption(
            kind,
            rid,
            amount=amount,
            balance_after=100_000,
            date=_stamp(at),
            order_id=order_id,
            customer_id=customer,
            voucher_id=voucher_id,
        )
        events.append((redemption_id, "redemption.succeeded", data))
        effects[redemption_id] = Effect(customer, KINDS[kind], -amount, rid)
        stream.redemptions.add(redemption_id)
        draw = rng.random()
        rolled_back = draw < 0.8
        if rolled_back and len(events) < n_unique:
            rollback_id = f"ev_{prefix}_{pair}_rb"
            data = card_rollback(
                kind,
                rid,
                f"rr_{prefix}_{pair}",
                amount=amount,
                balance_after=100_000 + amount,
                date=_stamp(at + timedelta(seconds=30)),
                order_id=order_id,
                customer_id=customer,
                voucher_id=voucher_id,
            )
            events.append((rollback_id, "redemption.rollback.succeeded", data))
            effects[rollback_id] = Effect(customer, KINDS[kind], amount, rid)
            stream.rollbacks.add(rollback_id)
            pair_of_rollback[rollback_id] = redemption_id
        if (draw < 0.08 or draw > 0.98) and len(events) < n_unique:
            failed_id = f"ev_{prefix}_{pair}_rf"
            code = "already_rolled_back" if rolled_back else rng.choice(REVIEW_CODES)
            data = card_rollback_failed(rid, f"rrf_{prefix}_{pair}", code=code)
            events.append((failed_id, "redemption.rollback.failed", data))
            stream.rollback_failures.add(failed_id)
        pair += 1

    # Spread each pair's later events a little further in the stream (natural order:
    # the rollback comes some deliveries after its redemption), then move some rollbacks
    # well before their redemptions.
    keyed = [(i + (rng.uniform(3, 40) if j != i else 0.0), j) for j, i in _positions(events)]
    order = [j for _, j in sorted(keyed)]
    events = [events[j] for j in order]
    rollbacks = [k for k, e in enumerate(events) if e[0] in pair_of_rollback]
    early = set(rng.sample(rollbacks, min(len(rollbacks), round(n * out_of_order))))
    position = {e[0]: k for k, e in enumerate(events)}
    keys: list[float] = []
    for k, (event_id, _, _) in enumerate(events):
        if k in early:
            keys.append(position[pair_of_rollback[event_id]] - rng.uniform(5, 40))
        else:
            keys.append(float(k))
    events = [events[k] for k in sorted(range(len(events)), key=keys.__getitem__)]

    bodies: list[tuple[str, str, bytes, bool]] = []
    seen: set[str] = set()
    for event_id, event_type, data in events:
        redemption_first = event_id not in pair_of_rollback or pair_of_rollback[event_id] in seen
        seen.add(event_id)
        created = _stamp(base + timedelta(seconds=len(bodies)))
        doc = envelope(event_type, data, event_id=event_id, created_at=created)
        bodies.append((event_id, event_type, body_of(doc), not redemption_first))

    # Duplicates: a body already sent, sent again 1 to 60 deliveries later.
    slots = sorted(
        ((rng.randrange(len(bodies)), rng.uniform(1, 60)) for _ in range(n_duplicates)),
        key=lambda s: s[0] + s[1],
    )
    merged: list[tuple[float, tuple[str, str, bytes, bool], bool]] = [
        (float(k), b, False) for k, b in enumerate(bodies)
    ]
    merged += [(k + lag, bodies[k], True) for k, lag in slots]
    merged.sort(key=lambda m: m[0])
    for index, (_, (event_id, event_type, body, early_flag), dup) in enumerate(merged):
        stream.deliveries.append(
            Delivery(
                index=index,
                event_id=event_id,
                type=event_type,
                body=body,
                signature=sign(body, SECRET),
                duplicate=dup,
                out_of_order=early_flag and not dup,
            )
        )
    return stream


def _positions(events: list[tuple[str, str, dict[str, object]]]) -> list[tuple[int, int]]:
    """(j, position of the pair's redemption) for each event j: a pair starts together."""
    first: dict[str, int] = {}
    result = []
    for j, (event_id, _, _) in enumerate(events):
        pair = event_id.rsplit("_", 1)[0]
        first.setdefault(pair, j)
        result.append((j, first[pair]))
    return result


# --- the sender ------------------------------------------------------------------------


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


@dataclass
class Outcome:
    """How each delivery ended: its last attempt, and whether it was given up."""

    final: dict[int, Attempt] = field(default_factory=dict)
    abandoned: list[int] = field(default_factory=list)


class Sender:
    """POST a stream from ``threads`` threads, each with its own keep-alive connection.

    ``rate`` (deliveries per second) paces the first attempts; None sends as fast as the
    threads go (a closed loop: ``threads`` requests in flight). ``set_port`` moves the
    sender to another web process, as a load balancer would.
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
        self._port = port
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
        return self._port

    def set_port(self, port: int) -> None:
        self._port = port

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
        conn: http.client.HTTPConnection | None = None
        conn_port = None
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
                if conn is None or conn_port != self._port:
                    if conn is not None:
                        conn.close()
                    conn_port = self._port
                    conn = http.client.HTTPConnection(self.host, conn_port, timeout=self.timeout)
                attempt, keep = self._post(conn, delivery, number)
                if not keep:
                    conn.close()
                    conn = None
                with self._lock:
                    self.attempts.append(attempt)
                if attempt.status == 202 or 400 <= attempt.status < 500:
                    final = attempt
                    break
                if self._stop.is_set():
                    break
                # No answer, 503 or another 5xx: Voucherify tries again later.
                self._stop.wait(self.retry_pause * random.uniform(0.5, 1.5))
            with self._lock:
                if final is None:
                    self.outcome.abandoned.append(index)
                else:
                    self.outcome.final[index] = final
                self._done += 1
                if self._done == len(self.deliveries):
                    self.finished_at = self.elapsed()
        if conn is not None:
            conn.close()

    def _post(
        self, conn: http.client.HTTPConnection, delivery: Delivery, number: int
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
            )
            return attempt, False
        ack_ms = (time.monotonic() - sent) * 1000
        delivery_id = None
        if response.status == 202:
            delivery_id = str(json.loads(payload)["delivery_id"])
        attempt = Attempt(
            delivery.index, number, sent - self.started_at, ack_ms, response.status, delivery_id
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
