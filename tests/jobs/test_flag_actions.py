"""Acting on a failed-rollback flag (``workers.jobs.flag_actions``): compensate, retry,
settle, against the fake Voucherify over HTTP and the real PostgreSQL; never twice.
(The same through the real web process and a browser: tests/ops/test_flag_actions_web.py.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from devtools.fake_voucherify import (
    DROP,
    ROLLBACK_WINDOW_KEY,
    Failure,
    FakeVoucherify,
    api_voucher,
)
from devtools.webhooks import card_redemption, card_rollback_failed, card_transaction_event
from tests.conftest import deliver
from tests.jobs.conftest import Clock, client, rows
from tests.jobs.verify_support import CARD_CODE, CARD_ID, failed_rollback_flag
from workers.jobs.flag_actions import ActionRefused, act, preview
from workers.jobs.voucherify_api import VoucherifyApi

pytestmark = pytest.mark.usefixtures("fresh_verify_tables")


@dataclass(frozen=True)
class Desk:
    """An operator's desk: flags to act on (``failed_rollback_flag``'s, the fake knowing
    the redemption and its card), previews and actions with the client on the fake, each
    given 30 s from the clock's now."""

    pool: ConnectionPool
    db: psycopg.Connection[Any]
    fake: FakeVoucherify
    api: VoucherifyApi
    clock: Clock

    def flag(self, code: str = ROLLBACK_WINDOW_KEY) -> int:
        """A failed-rollback flag: the rollback of r_1 refused with ``code``."""
        return failed_rollback_flag(self.pool, self.db, self.fake, code=code)

    def deadline(self) -> float:
        return self.clock.monotonic() + 30

    def preview(self, flag_id: int, kind: str) -> dict[str, Any]:
        return preview(self.pool, self.api, flag_id, kind, self.deadline())

    def act(self, flag_id: int, kind: str, by: str) -> dict[str, Any]:
        return act(self.pool, self.api, flag_id, kind, by, self.deadline())


@pytest.fixture
def desk(
    pool: ConnectionPool,
    db: psycopg.Connection[Any],
    fake: FakeVoucherify,
    api: VoucherifyApi,
    clock: Clock,
) -> Desk:
    return Desk(pool, db, fake, api, clock)


def flag_row(db: psycopg.Connection[Any], flag_id: int) -> tuple[Any, ...]:
    [row] = rows(db, "SELECT status, note FROM flags WHERE id = %s", flag_id)
    return row


def card_entries(db: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return rows(
        db,
        "SELECT effect, amount, transaction_id FROM ledger_entries WHERE voucher_id = %s"
        " ORDER BY id",
        CARD_ID,
    )


def test_compensate_previews_the_card_and_the_ledgers_amount_and_sends_nothing(
    desk: Desk, db: psycopg.Connection[Any], fake: FakeVoucherify
) -> None:
    flag_id = desk.flag()

    shown = desk.preview(flag_id, "compensate")

    [card] = shown["cards"]
    assert (card["voucher_id"], card["amount"], card["kind"], card["balance_now"]) == (
        CARD_ID,
        2000,
        "gift_credit",
        8000,
    )
    assert card["voucher_code"] == "\u2026" + CARD_CODE[-4:]  # masked
    assert shown["confirm"] is False
    assert fake.posts == []
    assert rows(db, "SELECT count(*) FROM flag_actions") == [(0,)]
    assert flag_row(db, flag_id)[0] == "open"


def test_compensate_adds_the_amount_once_and_the_later_webhook_is_the_same_entry(
    desk: Desk, db: psycopg.Connection[Any], fake: FakeVoucherify
) -> None:
    flag_id = desk.flag()

    action = desk.act(flag_id, "compensate", "alice")

    assert action["state"] == "succeeded"
    [(target, body)] = fake.posts
    assert target == f"/v1/vouchers/{CARD_ID}/balance"
    assert body == {
        "amount": 2000,
        "reason": "compensation of redemption r_1",
        "source_id": f"vfy-pipeline-action-{action['id']}-0",
    }
    [transaction] = fake.transactions[CARD_CODE]
    assert card_entries(db) == [("debit", -2000, None), ("movement", 2000, transaction["id"])]
    status, note = flag_row(db, flag_id)
    assert status == "resolved"
    assert "compensate asked by alice" in note
    assert transaction["id"] in note
    # Voucherify's own webhook of that transaction, after: the same entry.
    event = card_transaction_event("gift", transaction)
    deliver(desk.pool, event[0], event[1])
    assert card_entries(db) == [("debit", -2000, None), ("movement", 2000, transaction["id"])]
    with pytest.raises(ActionRefused) as again:
        desk.act(flag_id, "compensate", "bob")
    assert (again.value.status, again.value.code) == (409, "flag_resolved")
    assert len(fake.posts) == 1


def test_retry_rolls_back_with_the_attempts_reason_and_tracking_id(
    desk: Desk, db: psycopg.Connection[Any], fake: FakeVoucherify
) -> None:
    flag_id = desk.flag("rollback_failed_for_a_while")

    action = desk.act(flag_id, "retry", "alice")

    assert action["state"] == "succeeded"
    [(target, _body)] = fake.posts
    assert (
        target
        == "/v1/redemptions/r_1/rollback?reason=customer+returned+the+order&tracking_id=track_1"
    )
    assert rows(db, "SELECT status FROM redemptions WHERE redemption_id = 'r_1'") == [
        ("ROLLED_BACK",)
    ]
    assert [e[:2] for e in card_entries(db)] == [("debit", -2000), ("restore", 2000)]
    status, note = flag_row(db, flag_id)
    assert status == "resolved"
    assert note.startswith(f"retry asked by alice (action {action['id']}): rolled back")


def test_retry_of_what_voucherify_shows_rolled_back_sends_nothing_and_heals(
    desk: Desk, db: psycopg.Connection[Any], fake: FakeVoucherify
) -> None:
    flag_id = desk.flag("already_rolled_back")
    desk.api.rollback_redemption("r_1", "by hand", None, desk.deadline())  # in the dashboard
    fake.posts.clear()

    action = desk.act(flag_id, "retry", "alice")

    assert action["state"] == "succeeded"
    assert fake.posts == []
    assert [e[:2] for e in card_entries(db)] == [("debit", -2000), ("restore", 2000)]
    assert flag_row(db, flag_id)[0] == "resolved"


def test_a_retry_voucherify_refuses_fails_and_leaves_the_flag_open(
    desk: Desk, db: psycopg.Connection[Any], fake: FakeVoucherify
) -> None:
    flag_id = desk.flag()
    fake.rollback_window_closed.add("r_1")

    action = desk.act(flag_id, "retry", "alice")

    assert (action["state"], action["error"] is not None) == ("failed", True)
    status, note = flag_row(db, flag_id)
    assert status == "open"
    assert ROLLBACK_WINDOW_KEY in note
    # The flag can be acted on again: compensate now.
    assert desk.act(flag_id, "compensate", "alice")["state"] == "succeeded"


def test_settle_resolves_only_what_voucherify_shows_rolled_back(
    desk: Desk, db: psycopg.Connection[Any], fake: FakeVoucherify
) -> None:
    flag_id = desk.flag("already_rolled_back")

    assert desk.act(flag_id, "settle", "alice")["state"] == "failed"
    assert flag_row(db, flag_id)[0] == "open"

    desk.api.rollback_redemption("r_1", "by hand", None, desk.deadline())
    settled = desk.act(flag_id, "settle", "alice")

    assert settled["state"] == "succeeded"
    assert flag_row(db, flag_id)[0] == "resolved"
    assert [e[:2] for e in card_entries(db)] == [("debit", -2000), ("restore", 2000)]
    assert len(fake.posts) == 1  # the one made by hand


def test_a_lost_answer_is_looked_up_before_anything_is_sent_again(
    desk: Desk, db: psycopg.Connection[Any], fake: FakeVoucherify
) -> None:
    flag_id = desk.flag()
    fake.timeout_after_effect.add(f"/v1/vouchers/{CARD_ID}/balance")

    with pytest.raises(ActionRefused) as lost:
        desk.act(flag_id, "compensate", "alice")
    assert (lost.value.status, lost.value.code) == (504, "outcome_unknown")
    assert rows(db, "SELECT state FROM flag_actions") == [("unknown",)]

    fake.timeout_after_effect.clear()
    action = desk.act(flag_id, "compensate", "alice")

    assert action["state"] == "succeeded"
    assert len(fake.posts) == 1
    assert len(fake.transactions[CARD_CODE]) == 1
    assert [e[:2] for e in card_entries(db)] == [("debit", -2000), ("movement", 2000)]


def test_a_call_that_never_took_effect_is_sent_again_when_asked(
    desk: Desk, fake: FakeVoucherify
) -> None:
    flag_id = desk.flag("rollback_failed_for_a_while")
    fake.fail_first("/v1/redemptions/r_1/rollback", Failure(DROP))

    with pytest.raises(ActionRefused):
        desk.act(flag_id, "retry", "alice")
    action = desk.act(flag_id, "retry", "alice")

    assert action["state"] == "succeeded"
    assert len(fake.posts) == 2  # the first never reached the effect
    assert [r["status"] for r in [fake.redemptions["r_1"]]] == ["ROLLED_BACK"]
    assert len(fake.redemptions["r_1"]["related_redemptions"]["rollbacks"]) == 1


def test_the_budget_refuses_at_once_and_nothing_is_recorded(
    pool: ConnectionPool, db: psycopg.Connection[Any], fake: FakeVoucherify, clock: Clock
) -> None:
    flag_id = failed_rollback_flag(pool, db, fake)
    starved = client(pool, fake.url, clock, per_day=1)
    starved.get_redemption("r_1", clock.monotonic() + 30)  # the day's one call

    with pytest.raises(ActionRefused) as refused:
        act(pool, starved, flag_id, "compensate", "alice", clock.monotonic() + 30)

    assert (refused.value.status, refused.value.code) == (503, "budget_exhausted")
    assert refused.value.retry_after is not None
    assert refused.value.retry_after > 0
    assert fake.posts == []
    assert rows(db, "SELECT count(*) FROM flag_actions") == [(0,)]


def test_an_action_under_way_refuses_a_second_one(
    desk: Desk, fake: FakeVoucherify, database_url: str
) -> None:
    flag_id = desk.flag()
    with psycopg.connect(database_url) as other, other.transaction():
        other.execute("SELECT pg_advisory_xact_lock(%s, %s)", (0x76667961, flag_id))

        with pytest.raises(ActionRefused) as busy:
            desk.act(flag_id, "compensate", "bob")

    assert (busy.value.status, busy.value.code) == (409, "action_in_progress")
    assert fake.posts == []


def test_a_drift_flag_and_an_unknown_kind_are_refused_clearly(
    desk: Desk, db: psycopg.Connection[Any]
) -> None:
    flag_id = desk.flag()
    with pytest.raises(ActionRefused) as unknown:
        desk.act(flag_id, "refund", "alice")
    assert (unknown.value.status, unknown.value.code) == (400, "invalid_parameter")
    [(drift_id,)] = rows(
        db,
        "INSERT INTO flags (category, voucher_id, failure_code) VALUES ('drift', 'v', 'drift')"
        " RETURNING id",
    )
    with pytest.raises(ActionRefused) as drift:
        desk.preview(int(drift_id), "compensate")
    assert (drift.value.status, drift.value.code) == (409, "not_actionable")


def test_a_loyalty_cards_compensation_adds_its_points(
    desk: Desk, db: psycopg.Connection[Any], fake: FakeVoucherify
) -> None:
    deliver(desk.pool, "redemption.succeeded", card_redemption("loyalty", "r_pts", 300, 700))
    failed = card_rollback_failed(
        "r_pts", "rr_pts", ROLLBACK_WINDOW_KEY, voucher_id="v_loyalty_test"
    )
    deliver(desk.pool, "redemption.rollback.failed", failed)
    fake.vouchers["LOYAL-1"] = api_voucher("loyalty", "v_loyalty_test", "LOYAL-1", balance=700)
    [(flag_id,)] = rows(db, "SELECT id FROM flags WHERE redemption_id = 'r_pts'")

    action = desk.act(int(flag_id), "compensate", "alice")

    assert action["state"] == "succeeded"
    assert fake.posts[0][1]["amount"] == 300
    assert rows(
        db,
        "SELECT kind, effect, amount FROM ledger_entries WHERE voucher_id = 'v_loyalty_test'"
        " ORDER BY id",
    ) == [("loyalty_points", "debit", -300), ("loyalty_points", "movement", 300)]
