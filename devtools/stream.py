"""A stream of signed deliveries as Voucherify sends them.

Shared by the fault suite (``tests/fault/test_under_fire.py``) and the load benchmark
(``bench/load.py``), so both measure the same mix:

- card redemption / rollback pairs built from the published payloads
  (``devtools/webhooks.py``), gift and loyalty cards in turn, each pair with its own order,
  customer-card and voucher; most pairs are rolled back, some rollbacks fail
  (``already_rolled_back`` after a rollback, ``review`` codes otherwise);
- 10 % duplicates: a body already in the stream sent again, byte for byte, a little later;
- 5 % out of order: a rollback sent before its redemption;
- the ledger effect of every event, so the expected totals per customer and kind are known
  to the unit, computed over the events whose delivery was eventually answered 202.

``devtools.sender`` POSTs it as Voucherify would.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from devtools.webhooks import (
    SECRET,
    body_of,
    card_redemption,
    card_rollback,
    card_rollback_failed,
    envelope,
    sign,
)

KINDS = {"gift": "gift_credit", "loyalty": "loyalty_points"}
REVIEW_CODES = ("voucher_not_found", "order_already_canceled", "internal_error")


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


Event = tuple[str, str, dict[str, object]]  # (event_id, type, data)
Body = tuple[str, str, bytes, bool]  # (event_id, type, body, sent before its redemption)


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
    rng = random.Random(seed)  # noqa: S311 - a reproducible stream, not a secret
    n_duplicates = round(n * duplicates)
    base = datetime(2024, 2, 1, 8, 0, tzinfo=UTC)
    stream = Stream([], {})
    pair_of_rollback: dict[str, str] = {}  # rollback event id -> redemption event id
    events = _events(rng, stream, pair_of_rollback, n - n_duplicates, prefix, customers, base)
    events = _reorder(rng, events, pair_of_rollback, round(n * out_of_order))
    bodies = _bodies(events, pair_of_rollback, base)
    _deliver(rng, stream, bodies, n_duplicates)
    return stream


def _events(
    rng: random.Random,
    stream: Stream,
    pair_of_rollback: dict[str, str],
    n_unique: int,
    prefix: str,
    customers: int,
    base: datetime,
) -> list[Event]:
    """Events per pair: a redemption; 80 % a rollback; 10 % a failed rollback."""
    events: list[Event] = []
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
        stream.effects[redemption_id] = Effect(customer, KINDS[kind], -amount, rid)
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
            stream.effects[rollback_id] = Effect(customer, KINDS[kind], amount, rid)
            stream.rollbacks.add(rollback_id)
            pair_of_rollback[rollback_id] = redemption_id
        if (draw < 0.08 or draw > 0.98) and len(events) < n_unique:
            failed_id = f"ev_{prefix}_{pair}_rf"
            code = "already_rolled_back" if rolled_back else rng.choice(REVIEW_CODES)
            data = card_rollback_failed(
                rid, f"rrf_{prefix}_{pair}", code=code, order_id=order_id, voucher_id=voucher_id
            )
            events.append((failed_id, "redemption.rollback.failed", data))
            stream.rollback_failures.add(failed_id)
        pair += 1
    return events


def _reorder(
    rng: random.Random, events: list[Event], pair_of_rollback: dict[str, str], n_early: int
) -> list[Event]:
    """Spread each pair's later events a little further in the stream (natural order: the
    rollback comes some deliveries after its redemption), then move some rollbacks well
    before their redemptions."""
    keyed = [(i + (rng.uniform(3, 40) if j != i else 0.0), j) for j, i in _positions(events)]
    order = [j for _, j in sorted(keyed)]
    events = [events[j] for j in order]
    rollbacks = [k for k, e in enumerate(events) if e[0] in pair_of_rollback]
    early = set(rng.sample(rollbacks, min(len(rollbacks), n_early)))
    position = {e[0]: k for k, e in enumerate(events)}
    keys: list[float] = []
    for k, (event_id, _, _) in enumerate(events):
        if k in early:
            keys.append(position[pair_of_rollback[event_id]] - rng.uniform(5, 40))
        else:
            keys.append(float(k))
    return [events[k] for k in sorted(range(len(events)), key=keys.__getitem__)]


def _bodies(events: list[Event], pair_of_rollback: dict[str, str], base: datetime) -> list[Body]:
    bodies: list[Body] = []
    seen: set[str] = set()
    for event_id, event_type, data in events:
        redemption_first = event_id not in pair_of_rollback or pair_of_rollback[event_id] in seen
        seen.add(event_id)
        created = _stamp(base + timedelta(seconds=len(bodies)))
        doc = envelope(event_type, data, event_id=event_id, created_at=created)
        bodies.append((event_id, event_type, body_of(doc), not redemption_first))
    return bodies


def _deliver(rng: random.Random, stream: Stream, bodies: list[Body], n_duplicates: int) -> None:
    """The deliveries: every body once, and duplicates sent again 1 to 60 deliveries later."""
    slots = sorted(
        ((rng.randrange(len(bodies)), rng.uniform(1, 60)) for _ in range(n_duplicates)),
        key=lambda s: s[0] + s[1],
    )
    merged: list[tuple[float, Body, bool]] = [(float(k), b, False) for k, b in enumerate(bodies)]
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


def _positions(events: list[tuple[str, str, dict[str, object]]]) -> list[tuple[int, int]]:
    """(j, position of the pair's redemption) for each event j: a pair starts together."""
    first: dict[str, int] = {}
    result = []
    for j, (event_id, _, _) in enumerate(events):
        pair = event_id.rsplit("_", 1)[0]
        first.setdefault(pair, j)
        result.append((j, first[pair]))
    return result
