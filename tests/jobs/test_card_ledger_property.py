"""Property: a card's ledger adds up to Voucherify's balance, to the unit, whatever the
order and the duplicates of its webhooks; one missing movement is one drift flag naming
its gap, and its late arrival lets the drift job resolve it.

Random histories of one gift card and one loyalty card on one timeline (a step a minute):
top-ups, accruals, additions, activations, expiries, manual removals, redemptions and
their rollbacks, and stacked redemptions -- a parent whose children redeem the gift card
and/or the loyalty card (and maybe a discount coupon) -- and their rollbacks. Each
movement is sent as Voucherify would: its transaction event, its balance event where its
type has one (``voucher.*`` or its ``customer.*`` twin), and for a redemption or rollback
also the redemption or rollback webhook (a few milliseconds off its transaction). A
stack's parent has its own redemption webhook; its rollback has the parent's rollback
webhook, one per child, or both (each child's maybe); a child's card transactions name
the child or the parent. Every redemption has an order with its own random history
(created, paid, updated, canceled, at increasing ``updated_at``), each change its
``customer.order.*`` event; the redemption and rollback webhooks carry the order as of
one of those changes. Delivered through ``process_delivery`` in a random interleaving
with random duplicates, against the migrated PostgreSQL.

Histories are generated first and applied after (hypothesis would count the random calls
of a pool's threads against the strategy); each example starts from empty tables.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg_pool import ConnectionPool

from devtools.webhooks import (
    CARD_IDS,
    body_of,
    card_balance_event,
    card_redemption,
    card_rollback,
    card_transaction,
    card_transaction_event,
    coupon_redemption,
    coupon_rollback,
    envelope,
    order_event,
    stack_child,
    stack_parent_redemption,
    stack_parent_rollback,
    with_order_as_of,
)
from ops import store
from tests.conftest import DOMAIN_TABLES
from workers.jobs.drift import DriftResult, check_drift
from workers.processing import process_delivery

HOLDER, REDEEMER = "cust_holder", "cust_redeemer"
BASE = datetime(2024, 3, 1, 8, 0, tzinfo=UTC)
EXAMPLES = 50  # histories per test: about 5 s each on two cores
KINDS = {"gift": "gift_credit", "loyalty": "loyalty_points"}
CREDITS = {
    "gift": ["CREDITS_ADDITION"],
    "loyalty": ["POINTS_ACCRUAL", "POINTS_ADDITION", "PENDING_POINTS_ACTIVATION"],
}
DEBITS = {"gift": ["CREDITS_REMOVAL"], "loyalty": ["POINTS_EXPIRATION", "POINTS_REMOVAL"]}
REDEEM = {"gift": "CREDITS_REDEMPTION", "loyalty": "POINTS_REDEMPTION"}
REFUND = {"gift": "CREDITS_REFUND", "loyalty": "POINTS_REFUND"}
ORDER_CHANGES = {
    "customer.order.paid": ["PAID"],
    "customer.order.updated": ["CREATED", "PAID", "FULFILLED", "CANCELED"],
    "customer.order.canceled": ["CANCELED"],
}
SUCCEEDED, ROLLED_BACK = "SUCCEEDED", "ROLLED_BACK"

Webhook = tuple[str, str, dict[str, Any]]  # (event id, type, data)


@dataclass
class Movement:
    amount: int
    webhooks: list[Webhook] = field(default_factory=list)
    """Every webhook that carries the movement: without all of them it is lost. A stack's
    parent rollback carries the restore of each of its children's cards."""


@dataclass
class Card:
    kind: str
    movements: list[Movement]
    balance: int


@dataclass
class Order:
    id: str
    created_at: str
    changes: list[tuple[str, str, str | None]]
    """(event type, status, updated_at) of each change, oldest first; the first one is the
    order's creation (``updated_at`` None: dated by its ``created_at``)."""

    @property
    def final(self) -> tuple[str, datetime]:
        """The status and date of the latest change: what the order's row must hold."""
        _, status, updated_at = self.changes[-1]
        return status, datetime.fromisoformat(updated_at or self.created_at)


@dataclass
class Child:
    kind: str
    redemption_id: str
    spent: int
    debit_names_parent: bool
    """Whether its debit's card transaction names the stack's parent rather than the
    child itself."""
    refund_names_parent: bool
    """Likewise its refund's (drawn on its own)."""


@dataclass
class Stack:
    parent_id: str
    order: Order
    seen: int
    """The order's change the redemption webhooks carry (its index)."""
    children: list[Child]
    coupon_id: str | None


@dataclass
class History:
    cards: list[Card]
    orders: list[Order]
    statuses: dict[str, str]
    """The status each redemption (plain, parent, child, coupon) must end in."""
    parents: list[str]
    """The stacks' parents: no ledger entry may stay keyed by one."""
    arrivals: list[Webhook]
    """Every webhook, duplicates included, in the order they are delivered."""
    dropped: tuple[int, int] | None
    """(card, movement) whose webhooks the lossy run leaves out: strictly inside its card,
    and carrying no other movement (None when no movement is both)."""


def _stamp(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Timeline:
    """The state of one history while it is drawn: a step a minute, both cards."""

    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw
        self.balance = dict.fromkeys(KINDS, 0)
        self.movements: dict[str, list[Movement]] = {kind: [] for kind in KINDS}
        self.unrolled: dict[str, list[tuple[str, int, Order, int]]] = {k: [] for k in KINDS}
        self.stacks: list[Stack] = []
        self.orders: list[Order] = []
        self.statuses: dict[str, str] = {}
        self.parents: list[str] = []
        self.others: list[Webhook] = []
        """Webhooks that carry no card movement: parents, coupons, order events."""

    def ops(self) -> list[tuple[str, str | None]]:
        """What may happen next; stacks and rollbacks weigh more (they are the rarer)."""
        ops: list[tuple[str, str | None]] = []
        for kind in KINDS:
            ops.append(("credit", kind))
            ops += [("debit", kind), ("redeem", kind)] if self.balance[kind] > 0 else []
            ops += [("rollback", kind)] * 2 if self.unrolled[kind] else []
        ops += [("stack", None)] * 3 if any(self.balance.values()) else []
        ops += [("unstack", None)] * 3 if self.stacks else []
        return ops

    def step(self, i: int, op: str, kind: str | None) -> None:
        at = BASE + timedelta(minutes=i)
        ids = iter(f"ev_{i}_{j}" for j in range(20))
        if op == "stack":
            self.stack(i, at, ids)
        elif op == "unstack":
            self.unstack(i, at, ids)
        else:
            assert kind is not None
            self.plain(i, at, ids, op, kind)

    def jittered(self, at: datetime) -> str:
        return _stamp(at + timedelta(milliseconds=self.draw(st.integers(0, 900))))

    def order(self, redemption_id: str, at: datetime) -> Order:
        """A new order, created half a minute before ``at``, and its random changes."""
        draw = self.draw
        created = at - timedelta(seconds=30)
        order = Order(f"ord_{redemption_id}", _stamp(created), [])
        order.changes.append(
            ("customer.order.created", draw(st.sampled_from(["CREATED", "PAID"])), None)
        )
        changed = created
        for _ in range(draw(st.integers(0, 3))):
            changed += timedelta(seconds=draw(st.integers(1, 600)))
            event_type = draw(st.sampled_from(sorted(ORDER_CHANGES)))
            status = draw(st.sampled_from(ORDER_CHANGES[event_type]))
            order.changes.append((event_type, status, _stamp(changed)))
        self.orders.append(order)
        webhooks = [
            (
                f"ev_{order.id}_{j}",
                event_type,
                order_event(
                    event_type,
                    order.id,
                    status,
                    updated_at,
                    created_at=order.created_at,
                    customer_id=REDEEMER,
                ),
            )
            for j, (event_type, status, updated_at) in enumerate(order.changes)
        ]
        self.others += webhooks
        return order

    def seen(self, order: Order, after: int = 0) -> int:
        return self.draw(st.integers(after, len(order.changes) - 1))

    @staticmethod
    def as_of(data: dict[str, Any], order: Order, change: int) -> dict[str, Any]:
        _, status, updated_at = order.changes[change]
        return with_order_as_of(data, status, order.created_at, updated_at)

    def transaction(self, ids: Any, kind: str, transaction: dict[str, Any]) -> list[Webhook]:
        """The transaction event of a movement, and maybe its balance event (if its type
        has one: not a redemption's or a refund's)."""
        event_type, data = card_transaction_event(kind, transaction, holder_id=HOLDER)
        webhooks: list[Webhook] = [(next(ids), event_type, data)]
        twin = card_balance_event(
            kind, transaction, holder_id=HOLDER, customer_twin=self.draw(st.booleans())
        )
        if twin is not None and self.draw(st.booleans()):
            webhooks.append((next(ids), *twin))
        return webhooks

    def plain(self, i: int, at: datetime, ids: Any, op: str, kind: str) -> None:
        draw = self.draw
        redemption_id = rollback_id = None
        order, seen = None, 0
        if op == "credit":
            amount = draw(st.integers(min_value=1, max_value=5000))
            ttype = draw(st.sampled_from(CREDITS[kind]))
        elif op == "debit":
            amount = -draw(st.integers(min_value=1, max_value=self.balance[kind]))
            ttype = draw(st.sampled_from(DEBITS[kind]))
        elif op == "redeem":
            amount = -draw(st.integers(min_value=1, max_value=self.balance[kind]))
            ttype, redemption_id = REDEEM[kind], f"r_{kind}_{i}"
            order = self.order(redemption_id, at)
            seen = self.seen(order)
        else:
            index = draw(st.integers(0, len(self.unrolled[kind]) - 1))
            redemption_id, spent, order, seen = self.unrolled[kind].pop(index)
            seen = self.seen(order, after=seen)
            amount, ttype, rollback_id = spent, REFUND[kind], f"rr_{kind}_{i}"
        self.balance[kind] += amount
        balance = self.balance[kind]
        transaction = card_transaction(
            kind,
            f"vtx_{kind}_{i}",
            ttype,
            amount,
            balance,
            self.jittered(at),
            redemption_id=redemption_id,
            rollback_id=rollback_id,
            order_id=order.id if order else None,
        )
        movement = Movement(amount, self.transaction(ids, kind, transaction))
        if redemption_id is not None:
            assert order is not None
            who = {"customer_id": REDEEMER, "holder_id": HOLDER, "order_id": order.id}
            if rollback_id is None:
                data = card_redemption(
                    kind, redemption_id, -amount, balance, date=_stamp(at), **who
                )
                movement.webhooks.append(
                    (next(ids), "redemption.succeeded", self.as_of(data, order, seen))
                )
                self.unrolled[kind].append((redemption_id, -amount, order, seen))
                self.statuses[redemption_id] = SUCCEEDED
            else:
                data = card_rollback(
                    kind, redemption_id, rollback_id, amount, balance, date=_stamp(at), **who
                )
                movement.webhooks.append(
                    (next(ids), "redemption.rollback.succeeded", self.as_of(data, order, seen))
                )
                self.statuses[redemption_id] = ROLLED_BACK
        self.movements[kind].append(movement)

    def stack(self, i: int, at: datetime, ids: Any) -> None:
        """A stacked redemption: a child per card (one or both) and maybe a coupon's."""
        draw = self.draw
        parent_id = f"r_stack_{i}"
        order = self.order(parent_id, at)
        seen = self.seen(order)
        funded = [kind for kind in KINDS if self.balance[kind] > 0]
        # Both cards when both can pay, mostly; in either order of the children.
        choices = [funded, funded, funded[:1], funded[1:]] if len(funded) > 1 else [funded]
        kinds = draw(st.permutations(draw(st.sampled_from(choices))))
        who = {"customer_id": REDEEMER, "order_id": order.id, "date": _stamp(at)}
        stack = Stack(parent_id, order, seen, [], None)
        for kind in kinds:
            spent = draw(st.integers(1, self.balance[kind]))
            child = Child(
                kind, f"{parent_id}_{kind}", spent, draw(st.booleans()), draw(st.booleans())
            )
            self.balance[kind] -= child.spent
            balance = self.balance[kind]
            named = parent_id if child.debit_names_parent else child.redemption_id
            transaction = card_transaction(
                kind,
                f"vtx_{kind}_{i}",
                REDEEM[kind],
                -child.spent,
                balance,
                self.jittered(at),
                redemption_id=named,
                order_id=order.id,
            )
            data = card_redemption(
                kind, child.redemption_id, child.spent, balance, holder_id=HOLDER, **who
            )
            redeemed = stack_child(self.as_of(data, order, seen), parent_id)
            webhooks = self.transaction(ids, kind, transaction)
            webhooks.append((next(ids), "redemption.succeeded", redeemed))
            self.movements[kind].append(Movement(-child.spent, webhooks))
            stack.children.append(child)
            self.statuses[child.redemption_id] = SUCCEEDED
        if draw(st.booleans()):
            stack.coupon_id = f"{parent_id}_coupon"
            data = stack_child(
                self.as_of(coupon_redemption(stack.coupon_id, **who), order, seen), parent_id
            )
            self.others.append((next(ids), "redemption.succeeded", data))
            self.statuses[stack.coupon_id] = SUCCEEDED
        stacked = [c.redemption_id for c in stack.children]
        stacked += [stack.coupon_id] if stack.coupon_id else []
        total = sum(c.spent for c in stack.children)
        data = stack_parent_redemption(parent_id, total, stacked, **who)
        self.others.append((next(ids), "redemption.succeeded", self.as_of(data, order, seen)))
        self.statuses[parent_id] = SUCCEEDED
        self.parents.append(parent_id)
        self.stacks.append(stack)

    def unstack(self, i: int, at: datetime, ids: Any) -> None:
        """A stack's rollback: its parent's rollback webhook, a webhook per child, or both
        (each child's maybe); each child's card refunded."""
        draw = self.draw
        stack = self.stacks.pop(draw(st.integers(0, len(self.stacks) - 1)))
        parent_id, order = stack.parent_id, stack.order
        parent_rollback_id = f"rr_{parent_id}"
        seen = self.seen(order, after=stack.seen)
        who = {"customer_id": REDEEMER, "order_id": order.id, "date": _stamp(at)}
        parent_sent = draw(st.sampled_from([True, True, False]))
        total = sum(c.spent for c in stack.children)
        data = stack_parent_rollback(parent_id, parent_rollback_id, total, **who)
        parent: list[Webhook] = []
        if parent_sent:
            parent = [(next(ids), "redemption.rollback.succeeded", self.as_of(data, order, seen))]
            self.others += parent  # carries every child's restore: counted once, here
            self.statuses[parent_id] = ROLLED_BACK
        for child in stack.children:
            kind = child.kind
            self.balance[kind] += child.spent
            balance = self.balance[kind]
            child_rollback_id = f"rr_{child.redemption_id}"
            named = parent_id if child.refund_names_parent else child.redemption_id
            transaction = card_transaction(
                kind,
                f"vtx_{kind}_{i}",
                REFUND[kind],
                child.spent,
                balance,
                self.jittered(at),
                redemption_id=named,
                rollback_id=parent_rollback_id if named == parent_id else child_rollback_id,
                order_id=order.id,
            )
            webhooks = parent + self.transaction(ids, kind, transaction)
            if not parent_sent or draw(st.booleans()):
                data = card_rollback(
                    kind,
                    child.redemption_id,
                    child_rollback_id,
                    child.spent,
                    balance,
                    holder_id=HOLDER,
                    **who,
                )
                data = stack_child(self.as_of(data, order, seen), parent_id, parent_rollback_id)
                webhooks.append((next(ids), "redemption.rollback.succeeded", data))
            self.movements[kind].append(Movement(child.spent, webhooks))
            self.statuses[child.redemption_id] = ROLLED_BACK
        if stack.coupon_id is not None:
            if not parent_sent or draw(st.booleans()):
                data = coupon_rollback(stack.coupon_id, f"rr_{stack.coupon_id}", **who)
                data = stack_child(self.as_of(data, order, seen), parent_id, parent_rollback_id)
                self.others.append((next(ids), "redemption.rollback.succeeded", data))
            # The parent's rollback rolls back every child, the coupon's too.
            self.statuses[stack.coupon_id] = ROLLED_BACK


@st.composite
def histories(draw: st.DrawFn) -> History:
    timeline = _Timeline(draw)
    # Each card starts with a credit (nothing else can come first): both in either order.
    for i, kind in enumerate(draw(st.permutations(list(KINDS)))):
        timeline.step(i, "credit", kind)
    steps = draw(st.integers(min_value=8, max_value=14))
    for i in range(2, steps):
        timeline.step(i, *draw(st.sampled_from(timeline.ops())))
    # Three movements at least on each card, for one strictly inside it to go missing.
    for kind in KINDS:
        while len(timeline.movements[kind]) < 3:
            timeline.step(steps, "credit", kind)
            steps += 1
    cards = [Card(kind, timeline.movements[kind], timeline.balance[kind]) for kind in KINDS]
    carried = [w for card in cards for m in card.movements for w in m.webhooks]
    movements_of = Counter(w[0] for w in carried)
    webhooks = list({w[0]: w for w in carried + timeline.others}.values())
    duplicates = draw(st.lists(st.sampled_from(webhooks), max_size=8))
    arrivals = draw(st.permutations(webhooks + duplicates))
    droppable = [
        (c, m)
        for c, card in enumerate(cards)
        for m in range(1, len(card.movements) - 1)
        if all(movements_of[w[0]] == 1 for w in card.movements[m].webhooks)
    ]
    dropped = draw(st.sampled_from(droppable)) if droppable else None
    return History(cards, timeline.orders, timeline.statuses, timeline.parents, arrivals, dropped)


def _generate(n: int) -> list[History]:
    found: list[History] = []

    @settings(
        max_examples=n,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(history=histories())
    def collect(history: History) -> None:
        found.append(history)

    collect()
    return found


def _deliver(pool: ConnectionPool, webhook: Webhook) -> None:
    event_id, event_type, data = webhook
    body = body_of(envelope(event_type, data, event_id=event_id)).decode()
    outcome = process_delivery(pool, body, uuid.uuid4().hex, datetime.now(UTC).isoformat())
    assert outcome.status in ("processed", "duplicate"), (outcome, event_type)


def _drift(pool: ConnectionPool) -> DriftResult:
    return check_drift(pool, deadline=time.monotonic() + 60, quiet_seconds=0)


def _card_totals(db: psycopg.Connection[Any]) -> dict[str, int]:
    rows = db.execute("SELECT voucher_id, sum(amount) FROM ledger_entries GROUP BY 1").fetchall()
    return {voucher_id: int(total) for voucher_id, total in rows}


def _card_entries(db: psycopg.Connection[Any]) -> dict[str, int]:
    rows = db.execute("SELECT voucher_id, count(*) FROM ledger_entries GROUP BY 1").fetchall()
    return {voucher_id: int(n) for voucher_id, n in rows}


def _open_drift(db: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    return db.execute(
        "SELECT voucher_id, failure_message FROM flags WHERE category = 'drift' AND status = 'open'"
    ).fetchall()


def _orders(db: psycopg.Connection[Any]) -> dict[str, tuple[str, datetime]]:
    rows = db.execute("SELECT order_id, status, status_at FROM orders").fetchall()
    return {order_id: (status, at) for order_id, status, at in rows}


def _reset(db: psycopg.Connection[Any]) -> None:
    db.execute(f"TRUNCATE {', '.join(DOMAIN_TABLES)} RESTART IDENTITY CASCADE")


def _assert_books(db: psycopg.Connection[Any], history: History) -> None:
    """Each movement one entry, each card's entries adding up to its balance to the unit,
    on the holder's ledger; every redemption and order as Voucherify left it."""
    assert _card_totals(db) == {CARD_IDS[c.kind]: c.balance for c in history.cards}
    assert _card_entries(db) == {CARD_IDS[c.kind]: len(c.movements) for c in history.cards}
    keyed_by_parent = db.execute(
        "SELECT redemption_id, effect FROM ledger_entries WHERE redemption_id = ANY(%s)",
        (history.parents,),
    ).fetchall()
    assert keyed_by_parent == []  # a child's card entries are the child's
    waiting = db.execute("SELECT count(*) FROM ledger_entries WHERE stack_parent_id IS NOT NULL")
    assert waiting.fetchone() == (0,)  # every child came, and took what waited for it
    # The holder's ledger (ops), not the redeemer's, holds the cards' movements.
    holder = store.ledger(db, HOLDER, limit=200)["totals"]
    assert holder == {KINDS[c.kind]: c.balance for c in history.cards}
    assert store.ledger(db, REDEEMER)["entries"] == []
    statuses = dict(db.execute("SELECT redemption_id, status FROM redemptions").fetchall())
    assert statuses == history.statuses
    assert _orders(db) == {order.id: order.final for order in history.orders}


def test_any_interleaving_of_all_webhooks_adds_up_to_the_balance_and_never_drifts(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    examples = _generate(EXAMPLES)
    with ConnectionPool(database_url, min_size=1, max_size=2) as pool:
        for history in examples:
            _reset(db)
            for webhook in history.arrivals:
                _deliver(pool, webhook)

            _assert_books(db, history)
            result = _drift(pool)
            assert (result.cards, result.drifting, result.flags_raised) == (2, 0, 0), result
            assert db.execute("SELECT category, status FROM flags").fetchall() == []


def test_one_missing_movement_is_one_flag_naming_its_gap_until_it_arrives(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    examples = [history for history in _generate(EXAMPLES) if history.dropped is not None]
    assert len(examples) >= EXAMPLES // 2
    with ConnectionPool(database_url, min_size=1, max_size=2) as pool:
        for history in examples:
            _reset(db)
            assert history.dropped is not None
            card_index, movement_index = history.dropped
            card = history.cards[card_index]
            missing = card.movements[movement_index]
            lost = {w[0] for w in missing.webhooks}
            for webhook in history.arrivals:
                if webhook[0] not in lost:
                    _deliver(pool, webhook)

            assert _drift(pool).flags_raised == 1
            [(voucher_id, message)] = _open_drift(db)
            assert voucher_id == CARD_IDS[card.kind]
            assert f"difference {missing.amount:+d}" in message, message

            for webhook in missing.webhooks:
                _deliver(pool, webhook)
            result = _drift(pool)
            assert (result.flags_resolved, result.drifting) == (1, 0), result
            assert _open_drift(db) == []
            _assert_books(db, history)
            assert db.execute("SELECT category, status FROM flags").fetchall() == [
                ("drift", "resolved")
            ]
