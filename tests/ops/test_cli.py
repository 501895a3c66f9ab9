"""``vfy-pipeline``: the operator's questions answered from the command line."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from devtools.fake_voucherify import APP_ID, APP_TOKEN, FakeVoucherify
from ops.cli import build_parser, main
from tests.jobs.verify_support import CARD_CODE, failed_rollback_flag
from tests.ops.conftest import State
from workers.queue import DELIVERY_QUEUE

pytestmark = pytest.mark.usefixtures("fresh_verify_tables")

COMMANDS = [
    [],
    ["events"],
    ["events", "show"],
    ["events", "list"],
    ["events", "replay"],
    ["redemptions"],
    ["redemptions", "show"],
    ["orders"],
    ["orders", "show"],
    ["customers"],
    ["customers", "ledger"],
    ["search"],
    ["flags"],
    ["flags", "list"],
    ["flags", "resolve"],
    ["flags", "act"],
    ["dead-letters"],
    ["dead-letters", "list"],
    ["dead-letters", "replay"],
    ["stats"],
    ["jobs"],
    ["jobs", "run"],
    ["config"],
    ["config", "check"],
    ["migrations"],
    ["migrations", "status"],
]


class Cli:
    def __init__(self, database_url: str, redis_url: str, capsys: pytest.CaptureFixture[str]):
        self.environ = {"DATABASE_URL": database_url, "REDIS_URL": redis_url}
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        out = io.StringIO()
        self.capsys.readouterr()
        code = main(list(argv), environ=self.environ, out=out)
        return code, out.getvalue(), self.capsys.readouterr().err

    def json(self, *argv: str) -> Any:
        code, out, err = self(*argv, "--json")
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def cli(database_url: str, redis_url: str, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(database_url, redis_url, capsys)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: vfy-pipeline {' '.join(command)}".rstrip())


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "vfy-pipeline"
    result = subprocess.run(
        [str(script), "stats", "--help"], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "usage: vfy-pipeline stats" in result.stdout


def test_event_show_prints_the_event_and_its_deliveries(cli: Cli, state: State) -> None:
    code, out, _ = cli("events", "show", state.redeemed_event)
    assert code == 0
    assert f"event {state.redeemed_event}" in out
    assert "processed" in out
    assert "d_ops_1" in out
    assert "d_ops_2" in out
    assert "duplicate" in out
    document = cli.json("events", "show", state.redeemed_event)
    assert document["delivery_ids"] == ["d_ops_1", "d_ops_2"]
    assert document["status"] == "processed"
    # --json before the command works too.
    code, out, _ = cli("--json", "events", "show", state.redeemed_event)
    assert json.loads(out)["event_id"] == state.redeemed_event


def test_what_happened_to_a_redemption(cli: Cli, state: State) -> None:
    code, out, _ = cli("redemptions", "show", state.redeemed)
    assert code == 0
    assert "ROLLED_BACK" in out
    assert "redemption.succeeded" in out
    assert "redemption.rollback.succeeded" in out
    assert "-2000" in out
    assert "2000" in out
    document = cli.json("redemptions", "show", state.redeemed)
    assert document["status"] == "ROLLED_BACK"
    assert document["rollback_id"] == state.rollback_id
    assert cli.json("orders", "show", state.order_id)["status"] == "CANCELED"
    ledger = cli.json("customers", "ledger", state.customer_id)
    assert ledger["totals"] == {"gift_credit": 0, "loyalty_points": -300}
    assert cli.json("search", state.rollback_id)["redemptions"][0]["redemption_id"] == (
        state.redeemed
    )


def test_what_failed_today(cli: Cli, state: State) -> None:
    code, out, _ = cli("events", "list", "--status", "failed,dead", "--since", "today")
    assert code == 0
    assert state.dead_event in out
    assert "validation failed" in out
    assert state.redeemed_event not in out
    listed = cli.json("events", "list", "--status", "failed", "--status", "dead")
    assert [e["event_id"] for e in listed["items"]] == [state.dead_event]
    page = cli.json("events", "list", "--limit", "3")
    assert len(page["items"]) == 3
    rest = cli.json("events", "list", "--limit", "500", "--cursor", page["next_cursor"])
    assert len(rest["items"]) == 5


def test_flags_list_and_resolve(cli: Cli, state: State, db: psycopg.Connection[Any]) -> None:
    code, out, _ = cli("flags", "list", "--status", "open", "--code", "voucher_disabled")
    assert code == 0
    assert out.count("voucher_disabled") == 2
    flags = cli.json("flags", "list", "--status", "open")
    assert len(flags["items"]) == 3
    flag_id = flags["items"][0]["id"]
    code, out, _ = cli("flags", "resolve", str(flag_id), "--note", "refunded by hand")
    assert code == 0
    assert f"flag {flag_id} resolved" in out
    assert db.execute("SELECT status, note FROM flags WHERE id = %s", (flag_id,)).fetchone() == (
        "resolved",
        "refunded by hand",
    )
    again = cli.json("flags", "resolve", str(flag_id), "--note", "other")
    assert again["note"] == "refunded by hand"
    assert len(cli.json("flags", "list", "--status", "open")["items"]) == 2


def test_dead_letters_list_and_replay(
    cli: Cli, state: State, db: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    code, out, _ = cli("dead-letters", "list", "--pending")
    assert code == 0
    assert state.dead_event in out
    letter_id = cli.json("dead-letters", "list", "--type", "redemption.succeeded")["items"][0]["id"]
    dry = cli.json("dead-letters", "replay", str(letter_id), "--dry-run")
    assert dry["action"] == "would_requeue"
    assert redis_client.llen(DELIVERY_QUEUE) == 0
    code, out, _ = cli("dead-letters", "replay", str(letter_id))
    assert code == 0
    assert f"requeued                 {state.dead_event}" in out
    assert redis_client.llen(DELIVERY_QUEUE) == 1
    assert db.execute(
        "SELECT status FROM events WHERE event_id = %s", (state.dead_event,)
    ).fetchone() == ("received",)
    assert cli.json("dead-letters", "list", "--pending")["items"] == []


def test_replay_by_range_dry_run_prints_each_row_and_changes_nothing(
    cli: Cli, state: State, db: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    before = db.execute("SELECT event_id, status FROM events ORDER BY event_id").fetchall()
    code, out, _ = cli("events", "replay", "--since", "1h", "--status", "any", "--dry-run")
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("would_requeue")]
    assert len(rows) == 8
    assert any(state.redeemed_event in row and "processed -> received" in row for row in rows)
    assert "dry run: 8 event(s) would be re-queued, 0 skipped; nothing done" in out
    assert db.execute("SELECT event_id, status FROM events ORDER BY event_id").fetchall() == before
    assert redis_client.llen(DELIVERY_QUEUE) == 0

    # The default statuses of a range are the failed and dead ones: "replay what failed".
    result = cli.json("events", "replay", "--since", "today")
    assert [(i["event_id"], i["action"]) for i in result["items"]] == [
        (state.dead_event, "requeued")
    ]
    assert redis_client.llen(DELIVERY_QUEUE) == 1
    assert db.execute("SELECT replayed_at IS NOT NULL FROM dead_letters").fetchone() == (True,)


def test_replay_by_id_requeues_even_a_processed_event(
    cli: Cli, state: State, db: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    db.execute("UPDATE events SET payload = NULL WHERE event_id = 'ev_ops_loy'")
    code, out, err = cli(
        "events", "replay", "--id", state.redeemed_event, "--id", "ev_ops_loy", "--id", "ev_nope"
    )
    assert code == 1  # one was not found, one has no payload any more
    assert f"requeued                 {state.redeemed_event}" in out
    assert "processed -> received" in out
    assert "skipped_payload_pruned   ev_ops_loy" in out
    assert "not found: event ev_nope" in err
    assert redis_client.llen(DELIVERY_QUEUE) == 1
    row = db.execute("SELECT status FROM events WHERE event_id = %s", (state.redeemed_event,))
    assert row.fetchone() == ("received",)


def test_unknown_ids_exit_1_and_bad_arguments_exit_2(cli: Cli, state: State) -> None:
    code, out, err = cli("events", "show", "ev_nope")
    assert (code, out) == (1, "")
    assert "not found: event ev_nope" in err
    assert cli("redemptions", "show", "r_nope")[0] == 1
    assert cli("flags", "resolve", "424242")[0] == 1
    assert cli("customers", "ledger", "cust_nope")[0] == 1
    assert cli("search", "nothing")[0] == 1
    code, _, err = cli("events", "list", "--since", "someday")
    assert code == 2
    assert "--since" in err
    assert cli("flags", "list", "--limit", "100000")[0] == 2
    assert cli("events", "replay")[0] == 2
    assert cli("events", "replay", "--id", "x", "--since", "today")[0] == 2


def test_stats(cli: Cli, state: State, redis_client: redis.Redis) -> None:
    redis_client.lpush(DELIVERY_QUEUE, b"{}")
    code, out, _ = cli("stats")
    assert code == 0
    assert "processed 6" in out
    assert "deliveries 1" in out
    assert "review 2" in out
    assert "1 to replay" in out
    document = cli.json("stats")
    assert document["queue_depth"]["deliveries"] == 1
    assert document["dead_letters_pending"] == 1


# --- jobs run -----------------------------------------------------------------------------


def test_jobs_run_runs_a_job_now_and_records_it(cli: Cli, database_url: str) -> None:
    answer = cli.json("jobs", "run", "redrive")
    assert (answer["job"], answer["status"]) == ("redrive", "succeeded")
    assert set(answer["result"]) >= {"redriven", "dead_lettered", "accepted_repushed"}
    with psycopg.connect(database_url) as conn:
        runs = conn.execute("SELECT job, outcome FROM job_runs").fetchall()
    assert runs == [("redrive", "succeeded")]

    code, out, _ = cli("jobs", "run", "retention")  # JSON without --json too (docs/contract.md)
    assert code == 0
    assert json.loads(out)["status"] == "succeeded"


def test_jobs_run_says_so_when_a_job_did_not_run(cli: Cli) -> None:
    code, out, _ = cli("jobs", "run", "verify", "--json")  # no VOUCHERIFY_API_* settings
    assert code == 3
    assert json.loads(out)["status"] == "disabled"


def test_jobs_run_refuses_an_unknown_job(cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli("jobs", "run", "vacuum")
    assert exit_info.value.code == 2
    assert "invalid choice: 'vacuum'" in capsys.readouterr().err


def test_flags_act_previews_without_yes_and_acts_with_it(
    cli: Cli, fake: FakeVoucherify, pool: Any, db: psycopg.Connection[Any]
) -> None:
    flag_id = failed_rollback_flag(pool, db, fake)
    cli.environ.update(
        VOUCHERIFY_API_URL=fake.url, VOUCHERIFY_APP_ID=APP_ID, VOUCHERIFY_APP_TOKEN=APP_TOKEN
    )

    code, out, _ = cli("flags", "act", str(flag_id), "--kind", "compensate")
    assert code == 0
    assert "add 2000 gift_credit to card" in out
    assert "not done: run again with --yes" in out
    assert fake.posts == []

    done = cli.json("flags", "act", str(flag_id), "--kind", "compensate", "--yes", "--by", "ops")
    assert (done["state"], done["requested_by"]) == ("succeeded", "ops")
    assert len(fake.transactions[CARD_CODE]) == 1
    code, _, err = cli("flags", "act", str(flag_id), "--kind", "retry", "--yes")
    assert code == 1
    assert "flag_resolved" in err


def test_the_cli_starts_without_the_jobs_or_the_delivery_path() -> None:
    """``vfy-pipeline`` imports a job (and the apply path under it) only when it runs one."""
    probe = (
        "import sys, ops.cli; "
        "print(sorted(m for m in sys.modules if m.startswith(('workers.jobs', "
        "'workers.processing', 'workers.handlers', 'celery'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
