"""Property: a card's ledger adds up to Voucherify's balance, to the unit, whatever the
order and the duplicates of its webhooks; one missing movement is one drift flag naming
its gap, and its late arrival lets the drift job resolve it.

Random histories of one gift card and one loyalty card (top-ups, accruals, additions,
activations, expiries, manual removals, redemptions and their rollbacks), each movement
sent as Voucherify would: its transaction event, its balance event where its type has
one (``voucher.*`` or its ``customer.*`` twin), and for a redemption or rollback also the
redemption or rollback webhook (a few milliseconds off its transaction). Delivered
through ``process_delivery`` in a random interleaving with random duplicates, against the
migrated PostgreSQL.

Histories are generated first and applied after (hypothesis would count the random calls
of a pool's threads against the strategy); each example starts from empty tables.
"""

from __future__ import annotations

import time
import uuid
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
    envelope,
)
from ops import store
from tests.conftest import DOMAIN_TABLES
from workers.jobs.drift import DriftResult, check_drift
from workers.processing import process_delivery

HOLDER, REDEEMER = "cust_holder", "cust_redeemer"
BASE = datetime(2024, 3, 1, 8, 0, tzinfo=UTC)
EXAMPLES = 25
KINDS = {"gift": "gift_credit", "loyalty": "loyalty_points"}
CREDITS = {
    "gift": ["CREDITS_ADDITION"],
    "loyalty": ["POINTS_ACCRUAL", "POINTS_ADDITION", "PENDING_POINTS_ACTIVATION"],
}
DEBITS = {"gift": ["CREDITS_REMOVAL"], "loyalty": ["POINTS_EXPIRATION", "POINTS_REMOVAL"]}
REDEEM = {"gift": "CREDITS_REDEMPTION", "loyalty": "POINTS_REDEMPTION"}
REFUND = {"gift": "CREDITS_REFUND", "loyalty": "POINTS_REFUND"}

Webhook = tuple[str, str, dict[str, Any]]  # (event id, type, data)


@dataclass
class Movement:
    amount: int
    webhooks: list[Webhook] = field(default_factory=list)


@dataclass
class Card:
    kind: str
    movements: list[Movement]
    balance: int


@dataclass
class History:
    cards: list[Card]
    order: list[Webhook]
    """Every webhook of both cards, duplicates included, in the order they are delivered."""
    dropped: tuple[int, int]
    """(card, movement) whose webhooks the lossy run leaves out: strictly inside its card."""


def _stamp(at: datetime) -> str:
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@st.composite
def card_history(draw: st.DrawFn, kind: str) -> Card:
    n = draw(st.integers(min_value=3, max_value=7))
    balance, movements, unrolled = 0, [], []
    for i in range(n):
        at = BASE + timedelta(minutes=i)
        ids = iter(f"ev_{kind}_{i}_{j}" for j in range(9))
        ops = ["credit"] + (["debit", "redeem"] if balance > 0 else [])
        ops += ["rollback"] if unrolled else []
        op = draw(st.sampled_from(ops))
        jitter = timedelta(milliseconds=draw(st.integers(min_value=0, max_value=900)))
        redemption_id = rollback_id = None
        if op == "credit":
            amount = draw(st.integers(min_value=1, max_value=5000))
            ttype = draw(st.sampled_from(CREDITS[kind]))
        elif op == "debit":
            amount = -draw(st.integers(min_value=1, max_value=balance))
            ttype = draw(st.sampled_from(DEBITS[kind]))
        elif op == "redeem":
            amount = -draw(st.integers(min_value=1, max_value=balance))
            ttype, redemption_id = REDEEM[kind], f"r_{kind}_{i}"
        else:
            redemption_id, spent = unrolled.pop(draw(st.integers(0, len(unrolled) - 1)))
            amount, ttype, rollback_id = spent, REFUND[kind], f"rr_{kind}_{i}"
        balance += amount
        transaction = card_transaction(
            kind,
            f"vtx_{kind}_{i}",
            ttype,
            amount,
            balance,
            _stamp(at + jitter),
            redemption_id=redemption_id,
            rollback_id=rollback_id,
        )
        movement = Movement(amount)
        event_type, data = card_transaction_event(kind, transaction, holder_id=HOLDER)
        movement.webhooks.append((next(ids), event_type, data))
        twin = card_balance_event(
            kind, transaction, holder_id=HOLDER, customer_twin=draw(st.booleans())
        )
        if twin is not None and draw(st.booleans()):
            movement.webhooks.append((next(ids), *twin))
        who = {"customer_id": REDEEMER, "holder_id": HOLDER, "order_id": f"ord_{kind}_{i}"}
        if op == "redeem":
            assert redemption_id is not None
            data = card_redemption(kind, redemption_id, -amount, balance, date=_stamp(at), **who)
            movement.webhooks.append((next(ids), "redemption.succeeded", data))
            unrolled.append((redemption_id, -amount))
        if op == "rollback":
            assert redemption_id is not None
            assert rollback_id is not None
            data = card_rollback(
                kind, redemption_id, rollback_id, amount, balance, date=_stamp(at), **who
            )
            movement.webhooks.append((next(ids), "redemption.rollback.succeeded", data))
        movements.append(movement)
    return Card(kind, movements, balance)


@st.composite
def histories(draw: st.DrawFn) -> History:
    cards = [draw(card_history("gift")), draw(card_history("loyalty"))]
    webhooks = [w for card in cards for m in card.movements for w in m.webhooks]
    duplicates = draw(st.lists(st.sampled_from(webhooks), max_size=6))
    order = draw(st.permutations(webhooks + duplicates))
    card = draw(st.integers(min_value=0, max_value=1))
    movement = draw(st.integers(min_value=1, max_value=len(cards[card].movements) - 2))
    return History(cards, order, (card, movement))


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


def _open_drift(db: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    return db.execute(
        "SELECT voucher_id, failure_message FROM flags WHERE category = 'drift' AND status = 'open'"
    ).fetchall()


def _reset(db: psycopg.Connection[Any]) -> None:
    db.execute(f"TRUNCATE {', '.join(DOMAIN_TABLES)} RESTART IDENTITY CASCADE")


def test_any_interleaving_of_all_webhooks_adds_up_to_the_balance_and_never_drifts(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    examples = _generate(EXAMPLES)
    with ConnectionPool(database_url, min_size=1, max_size=2) as pool:
        for history in examples:
            _reset(db)
            for webhook in history.order:
                _deliver(pool, webhook)

            for card in history.cards:
                assert _card_totals(db).get(CARD_IDS[card.kind], 0) == card.balance
            # The holder's ledger (ops), not the redeemer's, holds the cards' movements.
            holder = store.ledger(db, HOLDER, limit=200)["totals"]
            assert holder == {KINDS[c.kind]: c.balance for c in history.cards}
            assert store.ledger(db, REDEEMER)["entries"] == []
            result = _drift(pool)
            assert (result.cards, result.drifting, result.flags_raised) == (2, 0, 0), result
            assert _open_drift(db) == []


def test_one_missing_movement_is_one_flag_naming_its_gap_until_it_arrives(
    database_url: str, db: psycopg.Connection[Any]
) -> None:
    examples = _generate(EXAMPLES)
    with ConnectionPool(database_url, min_size=1, max_size=2) as pool:
        for history in examples:
            _reset(db)
            card_index, movement_index = history.dropped
            card = history.cards[card_index]
            missing = card.movements[movement_index]
            lost = {w[0] for w in missing.webhooks}
            for webhook in history.order:
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
            assert _card_totals(db)[CARD_IDS[card.kind]] == card.balance
