"""Verify checks a stack through its children: against the fake API's listing in the
published shapes (``result`` and no ``status``, rollbacks as items of their own, a parent
and one child per card), lost webhooks of a stack are healed and what agrees is left alone."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from devtools.fake_voucherify import FakeVoucherify, api_redemption, api_rollback
from tests.jobs.verify_support import REDEEMED, ROLLED, run
from tests.workers.test_stacks import (
    CHILD_ROLLBACKS,
    PARENT,
    PARENT_ROLLBACK,
    ROLLED_BACK_BOOKS,
    STACK,
    apply,
    books,
)
from workers.jobs.voucherify_api import VoucherifyApi

pytestmark = pytest.mark.usefixtures("fresh_verify_tables")

CHILDREN = {"gift": ("r_stack_gift", 1000), "loyalty": ("r_stack_loyalty", 30)}


def _listed(obj: dict[str, Any]) -> dict[str, Any]:
    """As the published listing shows it: ``result``, no ``status``."""
    obj.pop("status", None)
    return obj


def _no_card(obj: dict[str, Any]) -> dict[str, Any]:
    """A stack's parent names no voucher of its own: the children moved the cards."""
    for key in ("gift", "loyalty_card", "voucher"):
        obj.pop(key, None)
    obj["voucher"] = None
    return obj


def listed_stack(rolled_back: bool, child_rollbacks: bool) -> list[dict[str, Any]]:
    """The listing's items of a stack: its parent, a child per card, their rollbacks."""
    parent = _no_card(api_redemption("gift", PARENT, 1030, date=REDEEMED))
    parent["related_redemptions"] = {
        "rollbacks": [{"id": PARENT_ROLLBACK, "date": ROLLED}] if rolled_back else [],
        "redemptions": [{"id": child, "date": REDEEMED} for child, _ in CHILDREN.values()],
    }
    items = [_listed(parent)]
    for kind, (child_id, amount) in CHILDREN.items():
        child = api_redemption(kind, child_id, amount, date=REDEEMED)
        child["redemption"] = PARENT
        items.append(_listed(child))
        if rolled_back and child_rollbacks:
            rollback = api_rollback(kind, f"rr_{child_id}", child_id, amount, date=ROLLED)
            items.append(_listed(rollback))
    if rolled_back:
        parent_rollback = _no_card(api_rollback("gift", PARENT_ROLLBACK, PARENT, 1030, date=ROLLED))
        items.append(_listed(parent_rollback))
    return items


@pytest.fixture(params=[True, False], ids=["child-rollbacks", "parent-only"])
def rolled_back_stack(request: pytest.FixtureRequest, fake: FakeVoucherify) -> None:
    """The fake lists the stack rolled back: with its children's rollbacks, or the parent's
    alone."""
    fake.add(*listed_stack(rolled_back=True, child_rollbacks=request.param))


@pytest.mark.usefixtures("rolled_back_stack")
def test_a_stack_whose_webhooks_were_all_lost_is_healed_through_its_children(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi
) -> None:
    result = run(pool, api)

    assert books(db) == ROLLED_BACK_BOOKS  # each child debited and restored once, no flag
    assert result.calls == 1  # one page: nothing fetched one by one
    assert result.mismatches == 0


@pytest.mark.usefixtures("rolled_back_stack")
def test_a_lost_rollback_of_a_stacks_parent_restores_every_childs_card(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi
) -> None:
    apply(pool, STACK[:3])  # the children's and the parent's redemptions came

    run(pool, api)

    assert books(db) == ROLLED_BACK_BOOKS


def test_a_stack_whose_webhooks_all_came_is_left_alone(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    apply(pool, STACK + CHILD_ROLLBACKS)
    before = db.execute("SELECT count(*), max(updated_at) FROM ledger_entries").fetchone()
    fake.add(*listed_stack(rolled_back=True, child_rollbacks=True))

    result = run(pool, api)

    assert (result.calls, result.applied, result.mismatches) == (1, 0, 0)
    assert books(db) == ROLLED_BACK_BOOKS
    assert db.execute("SELECT count(*), max(updated_at) FROM ledger_entries").fetchone() == before


def test_a_stack_that_was_not_rolled_back_agrees_with_its_debits(
    pool: ConnectionPool, db: psycopg.Connection[Any], api: VoucherifyApi, fake: FakeVoucherify
) -> None:
    fake.add(*listed_stack(rolled_back=False, child_rollbacks=False))

    run(pool, api)

    redemptions, entries, flags = books(db)
    assert redemptions == [
        (PARENT, "SUCCEEDED"),
        ("r_stack_gift", "SUCCEEDED"),
        ("r_stack_loyalty", "SUCCEEDED"),
    ]
    assert entries == [("r_stack_gift", "debit", -1000), ("r_stack_loyalty", "debit", -30)]
    assert flags == (0,)
