"""``POST /ops/api/flags/<id>/actions`` through the real web process (``web.serve``) and
the fake Voucherify over HTTP: compensate, retry (one redemption, a stack), settle, a
crash between the call and its record, two confirms at once, the budget refusing, no API.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from typing import Any

import psycopg
import pytest
import urllib3

from devtools.fake_voucherify import FakeVoucherify, api_redemption
from devtools.webhooks import (
    body_of,
    card_redemption,
    card_transaction_event,
    envelope,
    stack_child,
    stack_parent_redemption,
    wait_until,
)
from tests.conftest import deliver, post_signed
from tests.jobs.conftest import rows
from tests.jobs.verify_support import CARD_CODE, CARD_ID, REDEEMED
from tests.ops.conftest import AUTH, TOKEN, Site

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("fresh_verify_tables")]

HTTP = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=60))


def ask(port: int, flag_id: int, kind: str, confirm: bool, **more: Any) -> tuple[int, Any, Any]:
    """(status, JSON answer, headers) of one action request."""
    response = HTTP.request(
        "POST",
        f"http://127.0.0.1:{port}/ops/api/flags/{flag_id}/actions",
        body=json.dumps({"kind": kind, "confirm": confirm, **more}),
        headers={**AUTH, "Content-Type": "application/json"},
    )
    return response.status, json.loads(response.data), response.headers


def test_compensate_preview_then_confirm_adds_the_ledgers_amount_once(
    site: Site, db: psycopg.Connection[Any], fake: FakeVoucherify
) -> None:
    flag_id = site.flag()
    _, port = site.web()

    status, shown, _ = ask(port, flag_id, "compensate", False)
    assert status == 200
    assert [(c["voucher_id"], c["amount"], c["balance_now"]) for c in shown["cards"]] == [
        (CARD_ID, 2000, 8000)
    ]
    assert fake.posts == []

    status, done, _ = ask(port, flag_id, "compensate", True, by="alice")

    assert (status, done["state"], done["requested_by"]) == (200, "succeeded", "alice")
    assert len(fake.transactions[CARD_CODE]) == 1
    assert rows(db, "SELECT effect, amount FROM ledger_entries ORDER BY id") == [
        ("debit", -2000),
        ("movement", 2000),
    ]
    [(flag_status,)] = rows(db, "SELECT status FROM flags WHERE id = %s", flag_id)
    assert flag_status == "resolved"
    shown_flag = HTTP.request(
        "GET", f"http://127.0.0.1:{port}/ops/api/flags/{flag_id}", headers=AUTH
    )
    [action] = json.loads(shown_flag.data)["actions"]
    assert (action["kind"], action["state"]) == ("compensate", "succeeded")

    # Voucherify's own webhook of the transaction, later, through the receiver and a
    # worker: the same ledger entry.
    site.processes.worker(site.api_env())
    [transaction] = fake.transactions[CARD_CODE]
    event_type, data = card_transaction_event("gift", transaction)
    body = body_of(envelope(event_type, data, event_id="evtx_after_action"))
    answer, _ = post_signed(port, body)
    assert answer.status == 202
    wait_until(
        lambda: (
            rows(db, "SELECT status FROM events WHERE event_id = 'evtx_after_action'")
            == [("processed",)]
        ),
        what=site.processes.logs,
    )
    assert rows(db, "SELECT effect, amount FROM ledger_entries ORDER BY id") == [
        ("debit", -2000),
        ("movement", 2000),
    ]


def test_retry_of_a_single_redemption_and_of_a_stack(
    site: Site, db: psycopg.Connection[Any], fake: FakeVoucherify
) -> None:
    single = site.flag("rollback_failed_for_a_while")
    # A stack: parent p_1, one gift card child c_1 (another card than the single one's).
    deliver(site.pool, "redemption.succeeded", stack_parent_redemption("p_1", 500, ["c_1"]))
    child = stack_child(
        card_redemption("gift", "c_1", 500, 1500, date=REDEEMED, voucher_id="v_stack"), "p_1"
    )
    deliver(site.pool, "redemption.succeeded", child)
    failed = {
        "redemption": {"id": "p_1", "object": "redemption"},
        "redemption_rollback": {
            "id": "rr_p_1",
            "object": "redemption_rollback",
            "status": "FAILED",
            "redemption": "p_1",
            "failure_code": "rollback_failed_for_a_while",
            "failure_message": "try again",
        },
    }
    deliver(site.pool, "redemption.rollback.failed", failed)
    [(stack_flag,)] = rows(db, "SELECT id FROM flags WHERE redemption_id = 'p_1'")
    parent = api_redemption("gift", "p_1", 500, date=REDEEMED)
    parent.update({"voucher": None, "gift": None})
    theirs_child = api_redemption("gift", "c_1", 500, date=REDEEMED, voucher_id="v_stack")
    theirs_child["redemption"] = "p_1"
    fake.add(parent, theirs_child)
    _, port = site.web()

    assert ask(port, single, "retry", True)[1]["state"] == "succeeded"
    assert ask(port, stack_flag, "retry", True)[1]["state"] == "succeeded"

    targets = [target.split("?")[0] for target, _ in fake.posts]
    assert targets == ["/v1/redemptions/r_1/rollback", "/v1/redemptions/p_1/rollbacks"]
    assert rows(
        db,
        "SELECT redemption_id, status FROM redemptions WHERE redemption_id IN"
        " ('r_1', 'p_1', 'c_1') ORDER BY 1",
    ) == [("c_1", "ROLLED_BACK"), ("p_1", "ROLLED_BACK"), ("r_1", "ROLLED_BACK")]
    assert rows(
        db, "SELECT redemption_id, amount FROM ledger_entries WHERE effect = 'restore' ORDER BY 1"
    ) == [("c_1", 500), ("r_1", 2000)]
    assert rows(db, "SELECT count(*) FROM flags WHERE status = 'open'") == [(0,)]


def test_settle_of_an_already_rolled_back_flag_writes_nothing(
    site: Site, db: psycopg.Connection[Any], fake: FakeVoucherify
) -> None:
    flag_id = site.flag("already_rolled_back")
    fake.redemptions["r_1"]["status"] = "ROLLED_BACK"
    rollback = api_redemption("gift", "rr_by_hand", 2000, date=REDEEMED)
    rollback.update({"object": "redemption_rollback", "redemption": "r_1", "result": "SUCCESS"})
    fake.add(rollback)
    fake.redemptions["r_1"]["related_redemptions"]["rollbacks"] = [
        {"id": "rr_by_hand", "date": REDEEMED}
    ]
    _, port = site.web()

    status, done, _ = ask(port, flag_id, "settle", True)

    assert (status, done["state"]) == (200, "succeeded")
    assert fake.posts == []
    assert rows(db, "SELECT status FROM flags WHERE id = %s", flag_id) == [("resolved",)]


def test_the_web_killed_mid_call_then_asked_again_makes_one_balance_transaction(
    site: Site, db: psycopg.Connection[Any], fake: FakeVoucherify
) -> None:
    flag_id = site.flag()
    held = threading.Event()
    fake.held_after_effect[f"/v1/vouchers/{CARD_ID}/balance"] = held
    env = site.api_env()
    web, port = site.processes.web(env)
    asking = threading.Thread(target=lambda: _quietly(ask, port, flag_id, "compensate", True))
    asking.start()
    _wait(lambda: len(fake.posts) == 1)

    os.killpg(web.pid, signal.SIGKILL)  # between Voucherify's effect and our record of it
    web.wait(timeout=10)
    held.set()
    asking.join(timeout=30)
    assert rows(db, "SELECT state FROM flag_actions") == [("pending",)]

    _, port = site.processes.web(env)
    status, done, _ = ask(port, flag_id, "compensate", True)

    assert (status, done["state"]) == (200, "succeeded")
    assert len(fake.transactions[CARD_CODE]) == 1  # looked up, not sent again
    assert [target for target, _ in fake.posts] == [f"/v1/vouchers/{CARD_ID}/balance"]
    assert rows(db, "SELECT effect, amount FROM ledger_entries ORDER BY id") == [
        ("debit", -2000),
        ("movement", 2000),
    ]


def test_two_confirms_at_once_make_one_call_and_one_409(site: Site, fake: FakeVoucherify) -> None:
    flag_id = site.flag("rollback_failed_for_a_while")
    held = threading.Event()
    fake.held_after_effect["/v1/redemptions/r_1/rollback"] = held
    _, port = site.web()
    answers: list[tuple[int, Any, Any]] = []
    first = threading.Thread(target=lambda: answers.append(ask(port, flag_id, "retry", True)))
    first.start()
    _wait(lambda: len(fake.posts) == 1)

    second = ask(port, flag_id, "retry", True)
    held.set()
    first.join(timeout=30)

    assert (second[0], second[1]["error"]) == (409, "action_in_progress")
    assert [(a[0], a[1]["state"]) for a in answers] == [(200, "succeeded")]
    assert len(fake.posts) == 1


def test_the_budget_refuses_an_action_at_once_with_retry_after(
    site: Site, db: psycopg.Connection[Any], fake: FakeVoucherify
) -> None:
    flag_id = site.flag()
    _, port = site.web(VOUCHERIFY_API_CALLS_PER_DAY="1")
    assert ask(port, flag_id, "compensate", False)[0] == 200  # the day's one call

    status, answer, headers = ask(port, flag_id, "compensate", True)

    assert (status, answer["error"]) == (503, "budget_exhausted")
    assert int(headers["Retry-After"]) > 0
    assert fake.posts == []
    assert rows(db, "SELECT count(*) FROM flag_actions") == [(0,)]


def test_without_the_api_an_action_answers_a_clear_error(site: Site) -> None:
    flag_id = site.flag()
    _, port = site.processes.web(site.pipeline_env(OPS_API_TOKEN=TOKEN))

    status, answer, _ = ask(port, flag_id, "retry", False)

    assert (status, answer["error"]) == (409, "voucherify_api_not_configured")
    assert "VOUCHERIFY_API_URL" in answer["detail"]
    assert ask(port, flag_id, "bogus", False)[0] == 400


def _quietly(function: Any, *args: Any) -> None:
    """Ask a process that is killed meanwhile: its lost answer is the point."""
    with contextlib.suppress(urllib3.exceptions.HTTPError, OSError):
        function(*args)


def _wait(condition: Any, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.05)
