"""``vfy-pipeline`` explains itself: its version, the configuration as a process reads it
(secrets redacted, the process's own one-line error when it is wrong), and the state of
the migrations on a real PostgreSQL."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import psycopg
import pytest

from migrations import apply_migrations, migration_files
from ops.cli import main
from ops.cli.explain import package_version
from tests.conftest import ROOT, create_database, drop_database

GOOD = {
    "DATABASE_URL": "postgresql://app:db-password@127.0.0.1:9/shop",
    "REDIS_URL": "redis://:redis-password@127.0.0.1:9/0",
    "VOUCHERIFY_WEBHOOK_SECRET": "whsec-very-secret",
    "OPS_API_TOKEN": "t" * 40,
    "VOUCHERIFY_APP_TOKEN": "app-token-secret",
}


def run(argv: list[str], environ: dict[str, str]) -> tuple[int, str]:
    out = io.StringIO()
    return main(argv, environ=environ, out=out), out.getvalue()


def test_version_is_the_packages() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ops.cli", "--version"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0
    assert result.stdout.strip() == f"vfy-pipeline {package_version()}"
    assert package_version()[0].isdigit()


def test_config_check_prints_every_setting_with_no_secret_in_it() -> None:
    code, out = run(["config", "check"], GOOD)
    assert code == 0
    assert "web: configuration ok" in out
    for secret in ("db-password", "redis-password", "whsec-very-secret", "t" * 40, "app-token"):
        assert secret not in out
    assert "postgresql://app:***@127.0.0.1:9/shop" in out
    document = json.loads(run(["config", "check", "--json"], GOOD)[1])
    assert document["process"] == "web"
    assert document["settings"]["webhook_secrets"] == "***"
    assert document["settings"]["ops_api_token"] == "***"
    assert document["settings"]["max_body_bytes"] == 1_048_576


@pytest.mark.parametrize(
    ("process", "environ", "line"),
    [
        ("web", {}, "web: configuration error: DATABASE_URL: required"),
        (
            "web",
            {k: v for k, v in GOOD.items() if k != "VOUCHERIFY_WEBHOOK_SECRET"},
            "web: configuration error: VOUCHERIFY_WEBHOOK_SECRET",
        ),
        (
            "worker",
            {**GOOD, "WORKER_BATCH_SIZE": "lots"},
            "worker: configuration error: WORKER_BATCH_SIZE",
        ),
    ],
)
def test_config_check_fails_with_the_processs_own_line_and_status_2(
    process: str, environ: dict[str, str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        run(["config", "check", "--process", process], environ)
    assert exited.value.code == 2
    [printed] = capsys.readouterr().err.strip().splitlines()
    assert printed.startswith(line)


def test_a_worker_needs_no_webhook_secret() -> None:
    environ = {k: v for k, v in GOOD.items() if k != "VOUCHERIFY_WEBHOOK_SECRET"}
    assert run(["config", "check", "--process", "worker"], environ)[0] == 0


def test_migrations_status_lists_pending_then_applied_and_exits_1_until_up_to_date(
    postgres_server: str, redis_url: str
) -> None:
    url = create_database(postgres_server, migrated=False)
    environ = {"DATABASE_URL": url, "REDIS_URL": redis_url}
    try:
        code, out = run(["migrations", "status", "--json"], environ)
        document = json.loads(out)
        assert code == 1
        assert document["pending"] == [version for version, _ in migration_files()]
        with psycopg.connect(url) as conn:
            apply_migrations(conn)
        code, out = run(["migrations", "status"], environ)
        assert code == 0
        assert f"{len(migration_files())} applied, 0 pending" in out
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("INSERT INTO schema_migrations (version) VALUES ('9999_from_the_future')")
        code, out = run(["migrations", "status"], environ)
        assert code == 1
        assert "9999_from_the_future" in out
        assert "1 unknown to this code" in out
    finally:
        drop_database(postgres_server, url)
