"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright),
served by a real web process: log in, resolve a flag, replay a dead letter, search.

Screenshots are kept in tests/artifacts/. Outside CI the test is skipped when Chromium or
Playwright is missing (``apt-get install chromium``; ``pip install -e '.[dev]'``); in CI
(``CI`` set) it must run, and fails instead. ``scripts/setup`` installs Chromium.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from devtools.fake_voucherify import APP_ID, APP_TOKEN, FakeVoucherify
from tests.conftest import ROOT, PipelineEnv, Processes
from tests.jobs.verify_support import CARD_CODE
from tests.ops.conftest import TOKEN, Site, State
from workers.queue import DELIVERY_QUEUE

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("fresh_verify_tables")]


ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    missing = []
    if not Path(path).exists():
        missing.append("Debian's chromium package (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install -e '.[dev]')")
    if missing:
        reason = "the browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(reason + ": CI must run it (scripts/setup installs chromium)")
        pytest.skip(reason)
    return path


@pytest.fixture
def page() -> Iterator[Any]:
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            yield context.new_page()
        finally:
            browser.close()


def test_an_operator_logs_in_resolves_a_flag_and_replays_a_dead_letter(
    page: Any,
    processes: Processes,
    pipeline_env: PipelineEnv,
    state: State,
    db: psycopg.Connection[Any],
    redis_client: redis.Redis,
) -> None:
    _, port = processes.web(pipeline_env(OPS_API_TOKEN=TOKEN))
    base = f"http://127.0.0.1:{port}"
    ARTIFACTS.mkdir(exist_ok=True)
    page.set_default_timeout(15_000)

    # Not logged in: the login form, with 401.
    response = page.goto(f"{base}/ops/")
    assert response.status == 401
    page.fill("input[name=token]", "wrong")
    page.click("button[type=submit]")
    assert "not the one configured" in page.content()
    page.fill("input[name=token]", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_selector("h1:has-text('Overview')")
    assert page.url == f"{base}/ops/"
    page.screenshot(path=str(ARTIFACTS / "ops-dashboard-overview.png"), full_page=True)

    # Resolve the newest open flag with a note.
    flag_id = db.execute("SELECT max(id) FROM flags WHERE status = 'open'").fetchone()[0]
    row = page.locator(f"#flag-{flag_id}")
    row.locator("input[name=note]").fill("refunded by hand")
    row.locator("button:has-text('Resolve')").click()
    page.wait_for_selector(f"text=Flag {flag_id} resolved.")
    assert db.execute("SELECT status, note FROM flags WHERE id = %s", (flag_id,)).fetchone() == (
        "resolved",
        "refunded by hand",
    )
    assert page.locator(f"#flag-{flag_id}").count() == 0  # gone from the open flags

    # Replay the dead letter.
    letter_id = db.execute("SELECT id FROM dead_letters").fetchone()[0]
    page.locator(f"#dead-letter-{letter_id} button:has-text('Replay')").click()
    page.wait_for_selector(f"text=Event {state.dead_event} re-queued")
    assert db.execute("SELECT replayed_at IS NOT NULL FROM dead_letters").fetchone() == (True,)
    assert redis_client.llen(DELIVERY_QUEUE) == 1
    page.screenshot(path=str(ARTIFACTS / "ops-dashboard.png"), full_page=True)

    # What happened to a redemption: search its id.
    page.fill("input[name=q]", state.redeemed)
    page.press("input[name=q]", "Enter")
    page.click(f"a[href='/ops/redemptions/{state.redeemed}']")
    page.wait_for_selector("h1:has-text('Redemption')")
    assert "ROLLED_BACK" in page.content()
    assert "redemption.rollback.succeeded" in page.content()
    page.screenshot(path=str(ARTIFACTS / "ops-dashboard-redemption.png"), full_page=True)

    # Logging out ends the session.
    page.click("button:has-text('Log out')")
    page.wait_for_selector("input[name=token]")
    assert page.goto(f"{base}/ops/").status == 401


def test_an_operator_previews_and_confirms_a_compensation_on_the_flags_page(
    page: Any, site: Site, db: psycopg.Connection[Any], fake: FakeVoucherify
) -> None:
    flag_id = site.flag()
    env = site.pipeline_env(
        OPS_API_TOKEN=TOKEN,
        VOUCHERIFY_API_URL=fake.url,
        VOUCHERIFY_APP_ID=APP_ID,
        VOUCHERIFY_APP_TOKEN=APP_TOKEN,
    )
    _, port = site.processes.web(env)
    base = f"http://127.0.0.1:{port}"
    ARTIFACTS.mkdir(exist_ok=True)
    open_flag_page(page, base, flag_id)

    page.click("#preview-compensate")
    page.wait_for_selector("#preview")
    preview = page.inner_text("#preview")
    assert "2000" in preview  # the amount, from our ledger
    assert "8000" in preview  # the balance Voucherify reports now
    assert fake.posts == []
    page.screenshot(path=str(ARTIFACTS / "ops-flag-preview.png"), full_page=True)

    page.fill("#preview input[name=by]", "alice")
    page.click("#confirm")
    page.wait_for_selector("text=succeeded: the flag is resolved")

    assert "compensate asked by alice" in page.inner_text("#flag-note")
    assert "succeeded" in page.inner_text("#actions")
    assert len(fake.transactions[CARD_CODE]) == 1
    [(status,)] = db.execute("SELECT status FROM flags WHERE id = %s", (flag_id,)).fetchall()
    assert status == "resolved"
    page.screenshot(path=str(ARTIFACTS / "ops-flag-acted.png"), full_page=True)


def test_the_flags_page_hides_the_actions_without_the_api(page: Any, site: Site) -> None:
    flag_id = site.flag()
    _, port = site.processes.web(site.pipeline_env(OPS_API_TOKEN=TOKEN))
    open_flag_page(page, f"http://127.0.0.1:{port}", flag_id)

    assert page.locator("#preview-compensate").count() == 0
    assert "needs Voucherify's API" in page.content()


def open_flag_page(page: Any, base: str, flag_id: int) -> None:
    """Log in and land on the flag's page."""
    page.set_default_timeout(15_000)
    page.goto(f"{base}/ops/login?next=/ops/flags/{flag_id}")
    page.fill("input[name=token]", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_selector(f"h1:has-text('Flag {flag_id}')")
