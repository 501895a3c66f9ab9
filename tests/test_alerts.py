"""The alert rules of ``prometheus/alerts.yml``, unit-tested by ``promtool test rules``:
every rule fires on the series that should page someone and stays quiet on a healthy
pipeline's, names a runbook section of docs/operations.md that exists, and uses only
metrics the web app and the worker export.

The cases below become a promtool test file (written next to a copy of the rules in a
temporary folder): one ``alert_rule_test`` per case, expecting the alert's labels and
annotations when it fires and nothing when it is quiet. Needs ``promtool`` (Debian's
``prometheus`` package; ``scripts/setup`` installs it as root): CI fails without it,
elsewhere the test skips and says why.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY, generate_latest

from config.settings import Settings
from tests.conftest import ROOT
from web.app import create_app

RULES = ROOT / "prometheus" / "alerts.yml"
OPERATIONS = ROOT / "docs" / "operations.md"
WEBHOOK = 'path="/webhooks/voucherify"'
UP = ('pipeline_state_up{source="postgres"}', "1x200")


@dataclass(frozen=True)
class Case:
    alert: str
    fires: bool
    series: tuple[tuple[str, str], ...]
    at: str = "30m"
    labels: tuple[tuple[str, str], ...] = ()
    """Labels of the expected alert beyond the rule's own (its ``by`` labels)."""


def job_cases(job: str, window_minutes: int) -> list[Case]:
    alert = f"{job.capitalize()}JobNotSucceeding"
    runs = f'reconciliation_job_runs_total{{job="{job}",outcome='
    at = f"{window_minutes + 5}m"
    steps = f"0+1x{window_minutes + 10}"
    return [
        Case(alert, True, ((runs + '"failed"}', steps),), at),
        Case(alert, False, ((runs + '"failed"}', steps), (runs + '"succeeded"}', steps)), at),
        Case(alert, False, ((runs + '"succeeded"}', steps),), at),
    ]


def requests(code: str) -> str:
    return f'receiver_requests_total{{{WEBHOOK},code="{code}"}}'


QUEUE = 'pipeline_queue_depth{queue="deliveries"}'
ACCEPTED_QUEUE = 'pipeline_queue_depth{queue="deliveries.accepted"}'
OLDEST = "pipeline_oldest_waiting_event_age_seconds"
DEAD = 'worker_dead_letters_total{type="redemption.succeeded"}'
REVIEW = 'pipeline_open_flags{category="review"}'
SKIPPED = "voucherify_api_calls_skipped_total"
DRIFTING = 'reconciliation_drifting_cards{kind="gift"}'
REDIS_UP = 'pipeline_state_up{source="redis"}'

CASES = [
    Case("WebhooksAnswered5xx", True, ((requests("503"), "0+5x40"),)),
    Case("WebhooksAnswered5xx", False, ((requests("202"), "0+50x40"), (requests("503"), "3x40"))),
    Case("NoWebhooksReceived", True, (UP,), "3h"),
    Case("NoWebhooksReceived", True, (UP, (requests("202"), "7x200")), "3h"),
    Case("NoWebhooksReceived", False, (UP, (requests("202"), "0+1x200")), "3h"),
    Case("NoWebhooksReceived", False, (), "3h"),  # the pipeline is not up: other alerts say so
    Case("DeliveryQueueBacklog", True, ((QUEUE, "5000x40"),)),
    Case("DeliveryQueueBacklog", False, ((QUEUE, "20x40"), (ACCEPTED_QUEUE, "5000x40"))),
    Case("OldestWaitingEventTooOld", True, ((OLDEST, "0+60x40"),)),
    Case("OldestWaitingEventTooOld", False, ((OLDEST, "3x40"),)),
    Case("DeadLettersGrowing", True, ((DEAD, "0x10 1x30"),)),
    Case("DeadLettersGrowing", False, ((DEAD, "4x40"),)),
    Case("FlagsOpen", True, ((REVIEW, "2x40"),), labels=(("category", "review"),)),
    Case("FlagsOpen", False, ((REVIEW, "0x40"),)),
    Case("VoucherifyApiBudgetSpent", True, ((SKIPPED + '{reason="day"}', "0+3x40"),)),
    Case(
        "VoucherifyApiBudgetSpent",
        False,
        (
            (SKIPPED + '{reason="rate_limit_headers"}', "0+3x40"),
            (SKIPPED + '{reason="day"}', "0x40"),
        ),
    ),
    Case("CardsDrifting", True, ((DRIFTING, "1x100"),), "90m", (("kind", "gift"),)),
    Case("CardsDrifting", False, ((DRIFTING, "1x20 0x80"),), "90m"),
    Case("PipelineStateUnreadable", True, ((REDIS_UP, "0x40"), UP), labels=(("source", "redis"),)),
    Case("PipelineStateUnreadable", False, ((REDIS_UP, "1x40"), UP)),
    *job_cases("redrive", 10),
    *job_cases("verify", 30),
    *job_cases("drift", 120),
    *job_cases("retention", 2880),
]


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        reason = "promtool is missing (Debian's prometheus package: apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(reason + ": CI must run it (scripts/setup installs it)")
        pytest.skip(reason)
    return path


def test_promtool_finds_the_rules_valid_and_every_case_as_expected(tmp_path: Path) -> None:
    tool = promtool()
    shutil.copy(RULES, tmp_path / "alerts.yml")
    check = subprocess.run(
        [tool, "check", "rules", str(tmp_path / "alerts.yml")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    by_name = {rule["alert"]: rule for rule in rules()}
    tests = []
    for case in CASES:
        rule = by_name[case.alert]
        expected = []
        if case.fires:
            labels = {**rule.get("labels", {}), **dict(case.labels)}
            expected = [{"exp_labels": labels, "exp_annotations": rule["annotations"]}]
        tests.append(
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in case.series],
                "alert_rule_test": [
                    {"eval_time": case.at, "alertname": case.alert, "exp_alerts": expected}
                ],
            }
        )
    spec = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    result = subprocess.run(
        [tool, "test", "rules", "alerts_test.yml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_has_a_case_that_fires_and_one_that_stays_quiet() -> None:
    names = {rule["alert"] for rule in rules()}
    assert names == {case.alert for case in CASES}
    for name in names:
        outcomes = {case.fires for case in CASES if case.alert == name}
        assert outcomes == {True, False}, name


def test_every_rule_names_a_runbook_section_that_exists() -> None:
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in OPERATIONS.read_text(encoding="utf-8").splitlines()
        if line.startswith("#")
    }
    for rule in rules():
        runbook = rule["annotations"]["runbook"]
        page, _, anchor = runbook.partition("#")
        assert page == "docs/operations.md", rule["alert"]
        assert anchor in headings, f"{rule['alert']}: no section '{anchor}' in {page}"


PROMQL_WORDS = {
    "sum",
    "max",
    "min",
    "rate",
    "increase",
    "by",
    "on",
    "or",
    "and",
    "unless",
    "vector",
}


def metric_names_in_rules() -> set[str]:
    names = set()
    for rule in rules():
        expr = re.sub(r"\{[^}]*\}|\[[^]]*\]", " ", rule["expr"])  # label sets, ranges
        for word in re.findall(r"[a-z_][a-z0-9_]*", expr):
            if word not in PROMQL_WORDS and "_" in word:
                names.add(re.sub(r"_(bucket|count|sum)$", "", word))
    return names


def exported_names(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def test_every_metric_the_rules_use_is_one_the_processes_export(settings: Settings) -> None:
    """The web app's /metrics (its counters and the pipeline_* gauges read from a real
    PostgreSQL and Redis), and every metric the worker and its jobs declare."""
    import workers.jobs.metrics
    import workers.metrics  # noqa: F401 - declaring registers them

    web = create_app(settings).test_client().get("/metrics").get_data(as_text=True)
    exported = exported_names(web) | exported_names(generate_latest(REGISTRY).decode())
    used = metric_names_in_rules()
    assert {"receiver_requests_total", "pipeline_state_up", "worker_dead_letters_total"} <= used
    assert used - exported == set(), f"the rules use metrics nothing exports: {used - exported}"
