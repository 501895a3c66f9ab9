"""Every process through a real PgBouncer in transaction mode, on loopback.

PgBouncer in transaction mode hands a server connection to another client after each
transaction. What a client leaves on a server connection -- a prepared statement, a
session ``SET``, a session advisory lock -- is then another client's, and what it left
on the previous one is gone. The tests start Debian's ``pgbouncer`` (``scripts/setup``
installs it as root) in front of the session's PostgreSQL and show:

- the Procfile's processes work through it with ``DATABASE_POOLER=pgbouncer``: the
  release step (two at once still apply each migration once), a web process (webhooks,
  ``/readyz``, the ops API), a worker (each event applied exactly once), a job run and
  the CLI; and the connections each process holds are those docs/deployment.md counts;
- the truth about prepared statements on this PgBouncer: psycopg's default (prepare a
  statement on its 6th run) fails for the next client of the same server connection,
  and the setting's ``prepare_threshold`` (None) does not;
- session state leaks from one client to the next, the transaction-scoped forms the
  pipeline uses (``set_config(..., true)``, ``pg_advisory_xact_lock``) do not.

Without a ``pgbouncer`` binary the tests skip and say why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from config.settings import Settings
from devtools.servers import EmbeddedServerError, free_port, wait_for_port
from devtools.webhooks import SECRET, body_of, card_redemption, envelope, wait_until
from migrations import migration_files
from ops.context import OpsContext, direct_connect
from tests.conftest import (
    ROOT,
    Processes,
    create_database,
    drop_database,
    http_call,
    post_signed,
    process_env,
)
from web import health
from workers.db import close_pool, get_pool
from workers.jobs import run_job

PGBOUNCER_CANDIDATES = ("pgbouncer", "/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer")
START_SECONDS = 15.0
POOL_SIZE = 3
"""Server connections of the test database's pool: fewer than the processes' clients."""
SINGLE = "single"
"""A second name for the test database whose pool has one server connection: every client
of it takes turns on the same one, so what one leaves there the next one meets."""
OPS_TOKEN = "o" * 32
REDEMPTIONS = 30
LOCK_KEY = 0x766F7563  # migrations._LOCK_KEY: what a release step waits on


@dataclass(frozen=True)
class PgBouncer:
    """A running ``pgbouncer`` on 127.0.0.1 in front of one test database."""

    port: int
    database: str
    """The test database's name, which is also its name at PgBouncer."""
    direct_url: str
    """The same database, straight to PostgreSQL: for the test's own reads."""

    def url(self, dbname: str | None = None) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname or self.database}"

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW <what>`` on PgBouncer's admin console (simple protocol, no transaction)."""
        with psycopg.connect(
            self.url("pgbouncer"), autocommit=True, prepare_threshold=None, row_factory=dict_row
        ) as conn:
            return conn.execute(f"SHOW {what}").fetchall()  # what: a word of ours


def pgbouncer_binary() -> str | None:
    for candidate in PGBOUNCER_CANDIDATES:
        path = shutil.which(candidate)
        if path is not None:
            return path
    return None


def pgbouncer_version(binary: str) -> tuple[int, int]:
    output = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    match = re.search(r"PgBouncer (\d+)\.(\d+)", output)
    assert match, output
    return int(match.group(1)), int(match.group(2))


def pgbouncer_ini(directory: Path, port: int, server_url: str, version: tuple[int, int]) -> Path:
    """pool_mode = transaction, trust auth with an auth_file, listening on loopback only."""
    server = conninfo_to_dict(server_url)
    target = f"host={server.get('host', '127.0.0.1')} port={server.get('port', '5432')}"
    if server.get("password"):
        target += f" password={server['password']}"
    database, user = server["dbname"], server.get("user", "postgres")
    (directory / "userlist.txt").write_text(f'"{user}" ""\n"postgres" ""\n')
    lines = [
        "[databases]",
        f"{database} = {target} dbname={database} user={user}",
        f"{SINGLE} = {target} dbname={database} user={user} pool_size=1",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        "auth_type = trust",
        f"auth_file = {directory / 'userlist.txt'}",
        "admin_users = postgres",
        "pool_mode = transaction",
        f"default_pool_size = {POOL_SIZE}",
        "max_client_conn = 200",
        # No ignore_startup_parameters: a connection of ours sending one would be refused.
    ]
    if version >= (1, 21):
        # From 1.21 PgBouncer can track protocol-level prepared statements itself; off
        # here (its default until 1.24), so the tests see what 1.18 does.
        lines.append("max_prepared_statements = 0")
    ini = directory / "pgbouncer.ini"
    ini.write_text("\n".join(lines) + "\n")
    for path in (directory, *directory.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)  # readable by the unprivileged user
    return ini


@pytest.fixture
def fresh_database(postgres_server: str) -> Iterator[str]:
    """A new, empty database (no migrations: the release step applies them)."""
    url = create_database(postgres_server, migrated=False)
    yield url
    drop_database(postgres_server, url)


@pytest.fixture
def pgbouncer(fresh_database: str, tmp_path: Path) -> Iterator[PgBouncer]:
    binary = pgbouncer_binary()
    if binary is None:
        pytest.skip(
            "no pgbouncer binary on this machine (scripts/setup installs Debian's package "
            "as root; elsewhere: apt-get install pgbouncer)"
        )
    version = pgbouncer_version(binary)
    # PgBouncer refuses to run as root: then it switches to nobody, who must read the
    # configuration, hence a folder of its own outside pytest's private temp tree.
    directory = Path(tempfile.mkdtemp(prefix="vfy-pgbouncer-"))
    port = free_port()
    ini = pgbouncer_ini(directory, port, fresh_database, version)
    args = [binary, *(["-u", "nobody"] if os.geteuid() == 0 else []), str(ini)]
    log_path = tmp_path / "pgbouncer.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_port(port, timeout=START_SECONDS)
        except EmbeddedServerError:
            raise AssertionError(
                f"pgbouncer did not listen on {port}:\n{log_path.read_text(errors='replace')}"
            ) from None
        name = urlsplit(fresh_database).path.lstrip("/")
        yield PgBouncer(port, name, fresh_database)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # safe shutdown: the clients are gone by now
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        shutil.rmtree(directory, ignore_errors=True)


def settings_for(url: str, pooler: str = "pgbouncer") -> Settings:
    return Settings.from_env(
        {"DATABASE_URL": url, "REDIS_URL": "redis://127.0.0.1:9/0", "DATABASE_POOLER": pooler}
    )


def release(env: dict[str, str]) -> subprocess.Popen[str]:
    """``python -m migrations``, the Procfile's release step."""
    return subprocess.Popen(
        [sys.executable, "-m", "migrations"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def applied_by(output: str) -> list[str]:
    """The versions a release step says it applied (its ``migrations.done`` log line)."""
    for line in output.splitlines():
        if line.startswith("{") and json.loads(line).get("event") == "migrations.done":
            applied: list[str] = json.loads(line)["applied"]
            return applied
    raise AssertionError(f"no migrations.done line in:\n{output}")


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate(timeout=5)
        raise AssertionError(f"{proc.args} did not finish:\n{output}") from None
    assert proc.returncode == 0, output
    return output


# --- the processes ----------------------------------------------------------------------


@pytest.mark.e2e
def test_two_release_steps_through_pgbouncer_apply_each_migration_once(
    pgbouncer: PgBouncer,
) -> None:
    env = process_env(
        DATABASE_URL=pgbouncer.url(), REDIS_URL="redis://127.0.0.1:9/0", DATABASE_POOLER="pgbouncer"
    )
    versions = [version for version, _ in migration_files()]
    steps: list[subprocess.Popen[str]] = []
    try:
        # Another holder of the migrations' lock makes both release steps wait on it at once.
        with psycopg.connect(pgbouncer.direct_url) as blocker:
            blocker.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            steps = [release(env), release(env)]

            def both_waiting() -> bool:
                row = blocker.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                    " AND objid = %s AND NOT granted",
                    (LOCK_KEY,),
                ).fetchone()
                return row is not None and row[0] == 2

            wait_until(both_waiting, timeout=60, what="both release steps waiting on the lock")
            blocker.commit()  # the lock goes with the transaction
        outputs = [finish(step) for step in steps]
    finally:
        for step in steps:
            if step.poll() is None:
                step.kill()
                step.communicate(timeout=5)
    assert sorted(applied_by(output) for output in outputs) == [[], versions]
    with psycopg.connect(pgbouncer.direct_url) as conn:
        rows = conn.execute("SELECT version FROM schema_migrations ORDER BY 1").fetchall()
    assert [row[0] for row in rows] == versions
    # And once more, on an up-to-date database: nothing to do, exit 0.
    assert applied_by(finish(release(env))) == []


@pytest.mark.e2e
def test_web_worker_job_and_cli_through_pgbouncer_apply_each_event_once(
    pgbouncer: PgBouncer, processes: Processes, redis_url: str
) -> None:
    env = process_env(
        DATABASE_URL=pgbouncer.url(),
        REDIS_URL=redis_url,
        VOUCHERIFY_WEBHOOK_SECRET=SECRET,
        DATABASE_POOLER="pgbouncer",
        OPS_API_TOKEN=OPS_TOKEN,
        WORKER_METRICS_PORT="0",
        DB_POOL_MAX_SIZE="2",
        WEB_DB_POOL_MAX_SIZE="3",
    )
    assert applied_by(finish(release(env))) == [version for version, _ in migration_files()]
    web, port = processes.web(env)
    worker = processes.worker(env, concurrency=2)

    # Redemptions of one card, each sent twice: on each of the worker's connections (2
    # processes, 2 each, sharing 3 server connections with the web) every statement runs
    # more often than the 5 times after which psycopg's default would prepare it.
    redemptions = [f"r_pgb_{n}" for n in range(REDEMPTIONS)]
    accepted = []
    for n, redemption_id in enumerate(redemptions):
        doc = envelope(
            "redemption.succeeded",
            card_redemption(
                "gift",
                redemption_id,
                amount=100,
                balance_after=10_000 - 100 * (n + 1),
                order_id=f"ord_pgb_{n}",
            ),
            event_id=f"evred_pgb_{n}",
        )
        body = body_of(doc)
        carried = set()
        for _ in range(2):
            response, raw = post_signed(port, body)
            assert response.status == 202, raw
            carried.add(json.loads(raw)["delivery_id"])
        # The repeat is answered with the delivery that carries the first copy.
        assert len(carried) == 1
        accepted.extend(carried)

    with psycopg.connect(pgbouncer.direct_url, autocommit=True) as db:

        def all_recorded() -> bool:
            row = db.execute("SELECT count(*) FROM deliveries").fetchone()
            return row is not None and row[0] == len(accepted)

        wait_until(all_recorded, timeout=90, what=lambda: "every delivery\n" + processes.logs())
        events = dict(db.execute("SELECT event_id, status FROM events").fetchall())
        assert events == {f"evred_pgb_{n}": "processed" for n in range(len(redemptions))}
        outcomes = db.execute(
            "SELECT outcome, count(*) FROM deliveries GROUP BY 1 ORDER BY 1"
        ).fetchall()
        assert outcomes == [("processed", REDEMPTIONS)]
        debits = db.execute(
            "SELECT redemption_id, amount FROM ledger_entries ORDER BY redemption_id"
        ).fetchall()
        assert debits == sorted((r, -100) for r in redemptions)  # once each
        assert db.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)

        # /readyz asks PostgreSQL through PgBouncer on its own pool.
        def ready() -> bool:
            response, _ = http_call(port, "GET", "/readyz")
            return response.status == 200

        wait_until(ready, timeout=15, what=lambda: "/readyz 200\n" + processes.logs())
        # The ops API, on the web's ops pool.
        response, raw = http_call(
            port,
            "GET",
            "/ops/api/events/evred_pgb_3",
            headers={"Authorization": f"Bearer {OPS_TOKEN}"},
        )
        assert response.status == 200, raw
        assert json.loads(raw)["status"] == "processed"

        census = connections_by_process(pgbouncer)
        # A job run (as beat's schedule makes the worker do, or the CLI), in this process.
        settings = Settings.from_env(env)
        try:
            outcome = run_job("redrive", settings)
        finally:
            close_pool()
        assert outcome["status"] == "succeeded", outcome
        assert db.execute(
            "SELECT job, outcome FROM job_runs ORDER BY id DESC LIMIT 1"
        ).fetchone() == ("redrive", "succeeded")

        # The CLI: one plain connection per transaction.
        cli = subprocess.run(
            [
                str(Path(sys.executable).parent / "vfy-pipeline"),
                "--json",
                "events",
                "show",
                "evred_pgb_7",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["status"] == "processed"

    # What each process held (docs/deployment.md, "Connections and PgBouncer"): the worker's
    # main process none, each prefork process at most DB_POOL_MAX_SIZE, the gunicorn
    # process at most WEB_DB_POOL_MAX_SIZE on its ops pool and 1 on /readyz's; and all
    # of them together on no more than POOL_SIZE server connections.
    worker_children = children(worker.pid)
    web_children = children(web.pid)
    assert worker.pid not in census
    assert web.pid not in census  # gunicorn's master process
    for pid, kinds in census.items():
        if pid in worker_children:
            assert set(kinds) == {"pipeline"}, census
            assert kinds["pipeline"] <= 2, census  # DB_POOL_MAX_SIZE
        else:
            assert pid in web_children, (pid, census)
            assert kinds.get("pipeline", 0) <= 3, census  # WEB_DB_POOL_MAX_SIZE
            assert kinds.get("readyz", 0) <= 1, census
    assert set(worker_children) & set(census), census  # the worker did go through PgBouncer
    servers = [row for row in pgbouncer.show("SERVERS") if row["database"] == pgbouncer.database]
    assert len(servers) <= POOL_SIZE


def connections_by_process(pgbouncer: PgBouncer) -> dict[int, dict[str, int]]:
    """PgBouncer's clients of the test database: pid -> {"pipeline" | "readyz": count}, from
    the ``application_name`` each pool gives its connections."""
    census: dict[int, dict[str, int]] = {}
    for row in pgbouncer.show("CLIENTS"):
        match = re.fullmatch(r"voucherify-(pipeline|readyz)-(\d+)", row["application_name"])
        if row["database"] == pgbouncer.database and match:
            kinds = census.setdefault(int(match.group(2)), {})
            kinds[match.group(1)] = kinds.get(match.group(1), 0) + 1
    return census


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


# --- why the setting matters --------------------------------------------------------------


def run_twice_each(url: str, prepare_threshold: int | None, times: int = 12) -> None:
    """Two clients take turns running the same statement ``times`` times each."""
    with (
        psycopg.connect(url, autocommit=True, prepare_threshold=prepare_threshold) as first,
        psycopg.connect(url, autocommit=True, prepare_threshold=prepare_threshold) as second,
    ):
        for n in range(times):
            for conn in (first, second):
                conn.execute("SELECT %(n)s::int + 1", {"n": n})


def test_prepared_statements_clash_behind_pgbouncer_unless_the_setting_turns_them_off(
    pgbouncer: PgBouncer,
) -> None:
    # Both clients of the "single" pool share one server connection, as two processes of
    # ours share one whenever PgBouncer hands it on.
    url = pgbouncer.url(SINGLE)
    behind_pgbouncer = settings_for(url, "pgbouncer").db_prepare_threshold
    assert behind_pgbouncer is None
    run_twice_each(url, behind_pgbouncer)  # 24 runs, nothing prepared: fine

    direct = settings_for(url, "none").db_prepare_threshold  # psycopg's default, 5
    assert direct == 5
    with pytest.raises(errors.DuplicatePreparedStatement) as caught:
        run_twice_each(url, direct)
    # On its 6th run the first client prepared "_pg3_0" on the server connection; the
    # second client's 6th run prepares the same name on the same one, and fails.
    assert '"_pg3_0" already exists' in str(caught.value)
    # The first client's statement outlived it there: a client that prepares at once
    # fails on its first statement.
    with (
        psycopg.connect(url, autocommit=True, prepare_threshold=0) as eager,
        pytest.raises(errors.DuplicatePreparedStatement),
    ):
        eager.execute("SELECT %(n)s::int", {"n": 1})


def test_every_connection_of_ours_prepares_nothing_behind_pgbouncer(
    pgbouncer: PgBouncer,
) -> None:
    url = pgbouncer.url(SINGLE)
    settings = settings_for(url)
    # The web's ops pool follows DATABASE_POOLER (and takes WEB_DB_POOL_MAX_SIZE).
    context = OpsContext(settings)
    try:
        with context.transaction() as conn:
            assert conn.prepare_threshold is None
        pool = get_pool(url)  # the one the context made
        assert pool.kwargs["prepare_threshold"] is None
        assert pool.max_size == settings.web_db_pool_max_size
    finally:
        close_pool()
    with_prepares = OpsContext(settings_for(url, "none"))
    try:
        with with_prepares.transaction() as conn:
            assert conn.prepare_threshold == 5
    finally:
        close_pool()
    # The worker's pool, as workers.tasks and the job runner ask for it: no prepares.
    try:
        assert get_pool(url, settings.db_pool_max_size).kwargs["prepare_threshold"] is None
    finally:
        close_pool()
    # The CLI's connections.
    with direct_connect(url)(5) as conn:
        assert conn.prepare_threshold is None
    # /readyz's pool: no prepares, and no startup options PgBouncer would refuse.
    try:
        readiness = health.readiness_pool(url)
        assert readiness.kwargs["prepare_threshold"] is None
        assert "options" not in readiness.kwargs
        for _ in range(12):
            health.check_database(url)
    finally:
        health.close_readiness_pool()
    # Many runs of each, on the one shared server connection: nothing clashes.
    ops_again = OpsContext(settings)
    try:
        for n in range(12):
            with ops_again.transaction() as conn:
                conn.execute("SELECT %(n)s::int + 1", {"n": n})
            with direct_connect(url)(5) as conn:
                conn.execute("SELECT %(n)s::int + 1", {"n": n})
            health.check_database(url)
    finally:
        close_pool()
        health.close_readiness_pool()


def test_session_state_goes_to_the_next_client_transaction_state_does_not(
    pgbouncer: PgBouncer,
) -> None:
    url = pgbouncer.url(SINGLE)
    with (
        psycopg.connect(url, autocommit=True, prepare_threshold=None) as first,
        psycopg.connect(url, autocommit=True, prepare_threshold=None) as second,
    ):
        # A session SET by one client is the next client's.
        first.execute("SET statement_timeout = '1234ms'")
        assert second.execute("SHOW statement_timeout").fetchone() == ("1234ms",)
        second.execute("RESET statement_timeout")
        # A session advisory lock held by one client is the next client's too: the lock
        # is no lock at all (hence the migrations' pg_advisory_xact_lock).
        key = uuid.uuid4().int % 2**31
        assert first.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone() == (True,)
        assert second.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone() == (True,)
        second.execute("SELECT pg_advisory_unlock_all()")

        # The ops tools' statement_timeout is the transaction's (set_config(..., true)).
        context = OpsContext(settings_for(url), connect=direct_connect(url))
        with context.transaction(statement_timeout_ms=4321) as conn:
            assert conn.execute("SHOW statement_timeout").fetchone() == ("4321ms",)
        assert second.execute("SHOW statement_timeout").fetchone() == ("0",)
        # A transaction's advisory lock ends with it: the next client can take it.
        with first.transaction():
            first.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
        assert second.execute("SELECT pg_try_advisory_xact_lock(%s)", (key,)).fetchone() == (True,)
