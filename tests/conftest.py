"""Real servers for the tests.

Without ``TEST_DATABASE_URL`` / ``TEST_REDIS_URL`` the session starts its own PostgreSQL
and Redis from the embedded binaries (the same ones a local run uses), in a temporary
folder, and stops them at the end. With them, the tests use the given servers: each
session creates its own databases there (``vfy_test_<pid>_…``) and drops them after, and
uses its own Redis database number (``TEST_REDIS_DB``, default 15), flushed between tests.

The fault tests always start their own servers, since they stop and restart them.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import hypothesis
import psycopg
import pytest
import redis
from psycopg_pool import ConnectionPool

from config.settings import Settings
from devtools.fake_voucherify import FakeVoucherify, fake_voucherify
from devtools.servers import EmbeddedPostgres, EmbeddedRedis, free_port, wait_for_port
from devtools.webhooks import SECRET, body_of, envelope, sign
from migrations import apply_migrations
from workers.processing import process_delivery

# No per-example deadline: on two cores shared with real servers and processes, one slow
# example is scheduling, not a finding, and a deadline would make the suite flaky.
hypothesis.settings.register_profile("pipeline", deadline=None)
hypothesis.settings.load_profile("pipeline")

ROOT = Path(__file__).resolve().parent.parent
DOMAIN_TABLES = (
    "events",
    "deliveries",
    "dead_letters",
    "orders",
    "redemptions",
    "ledger_entries",
    "card_balances",
    "flags",
    "job_runs",
    "voucherify_api_calls",
    "voucherify_api_pace",
)


def _with_dbname(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An admin URL (database ``postgres``) of a server the session may create databases on."""
    given = os.environ.get("TEST_DATABASE_URL")
    if given:
        yield given
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("postgres"), durable=False)
    server.start()
    try:
        yield server.url()
    finally:
        server.stop(mode="immediate")


def create_database(admin_url: str, migrated: bool = True) -> str:
    name = f"vfy_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # name built above, not user input
    url = _with_dbname(admin_url, name)
    if migrated:
        with psycopg.connect(url, autocommit=True) as conn:
            apply_migrations(conn)
    return url


def drop_database(admin_url: str, url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def migrated_database(postgres_server: str) -> Iterator[str]:
    url = create_database(postgres_server)
    yield url
    drop_database(postgres_server, url)


@pytest.fixture
def database_url(migrated_database: str) -> str:
    """The session's migrated database, emptied before each test."""
    with psycopg.connect(migrated_database, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {', '.join(DOMAIN_TABLES)} RESTART IDENTITY CASCADE")
    return migrated_database


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection for reading what the code under test wrote."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def pool(database_url: str) -> Iterator[ConnectionPool]:
    """A pool on the test database, for the code under test."""
    with ConnectionPool(database_url, min_size=1, max_size=4, open=True) as pool:
        yield pool


@pytest.fixture
def fake() -> Iterator[FakeVoucherify]:
    """A fake Voucherify API on loopback (``devtools.fake_voucherify``)."""
    with fake_voucherify() as server:
        yield server


@pytest.fixture
def fresh_verify_tables(db: psycopg.Connection[Any]) -> None:
    """No watermark, call count or pace left by another test: a module whose tests call
    Voucherify asks for it with ``pytestmark = pytest.mark.usefixtures(...)``."""
    db.execute("TRUNCATE verify_watermarks, voucherify_api_calls, voucherify_api_pace")


def deliver(
    pool: ConnectionPool,
    event_type: str,
    data: Any,
    event_id: str | None = None,
    received_at: str | None = None,
) -> str:
    """Apply one webhook as the worker would (``process_delivery``); the outcome's status."""
    doc = envelope(event_type, data, event_id=event_id)
    return process_delivery(
        pool,
        body_of(doc).decode(),
        uuid.uuid4().hex,
        received_at or datetime.now(UTC).isoformat(),
    ).status


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    given = os.environ.get("TEST_REDIS_URL")
    if given:
        db_number = os.environ.get("TEST_REDIS_DB", "15")
        yield urlunsplit(urlsplit(given)._replace(path=f"/{db_number}"))
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url()
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: str) -> str:
    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    client.close()
    return redis_server


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def settings(database_url: str, redis_url: str) -> Settings:
    return Settings.from_env(
        {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "VOUCHERIFY_WEBHOOK_SECRET": SECRET,
        }
    )


# --- real processes -------------------------------------------------------------------


def run_captured(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``args`` run to their end in a process of their own, with only ``env``, in ``cwd``;
    its output captured as text, its exit code left for the test to check."""
    return subprocess.run(
        args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def process_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_"))}
    env.update({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "LOG_LEVEL": "INFO"})
    env.update(overrides)
    return env


def http_call(
    port: int,
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 15,
) -> tuple[http.client.HTTPResponse, bytes]:
    """One request to a process of this machine: the response, and its body read in full."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def post_signed(
    port: int, body: bytes, timeout: float = 15
) -> tuple[http.client.HTTPResponse, bytes]:
    """A webhook's ``body`` posted to a receiver with its signature (by ``SECRET``)."""
    headers = {"Content-Type": "application/json", "x-voucherify-signature": sign(body)}
    return http_call(port, "POST", "/webhooks/voucherify", body, headers, timeout)


class Processes:
    """Start real pipeline processes (as in the Procfile); stop them all at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: list[subprocess.Popen[bytes]] = []
        self.log_paths: dict[int, Path] = {}

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        path = self.log_dir / f"{name}-{len(self.running)}.log"
        with path.open("wb") as log:
            # The child keeps its own copy of the descriptor; ours is closed at once.
            proc = subprocess.Popen(
                args,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.running.append(proc)
        self.log_paths[proc.pid] = path
        return proc

    def log_of(self, proc: subprocess.Popen[bytes]) -> Path:
        """The file a process started here writes its output to."""
        return self.log_paths[proc.pid]

    def _celery(
        self, command: str, options: list[str], env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        """``celery <command>`` of the pipeline's app, as the Procfile runs it."""
        args = [
            sys.executable,
            "-m",
            "celery",
            "--quiet",  # no banner: every stdout line is a JSON log line
            "-A",
            "workers.app",
            command,
            "--loglevel",
            "INFO",
            *options,
        ]
        return self._spawn(command, args, env)

    def worker(
        self, env: dict[str, str], concurrency: int = 2, hostname: str | None = None
    ) -> subprocess.Popen[bytes]:
        """A ``worker`` as in the Procfile; ``hostname`` (``--hostname``) tells several apart,
        as the platform's dyno names do."""
        options = [
            "--queues",
            "deliveries,jobs",
            "--concurrency",
            str(concurrency),
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
        if hostname is not None:
            options += ["--hostname", hostname]
        return self._celery("worker", options, env)

    def beat(self, env: dict[str, str], schedule_file: Path) -> subprocess.Popen[bytes]:
        """A ``beat`` as in the Procfile; each one needs a schedule file of its own."""
        return self._celery("beat", ["--schedule", str(schedule_file)], env)

    def web(self, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        env = {**env, "PORT": str(port), "WEB_CONCURRENCY": env.get("WEB_CONCURRENCY", "1")}
        args = [sys.executable, "-m", "web.serve"]  # the Procfile's web
        proc = self._spawn("web", args, env)
        wait_for_port(port, timeout=30)
        return proc, port

    def stop_all(self) -> None:
        for proc in self.running:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.running:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(timeout=5)

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}"
            for path in sorted(self.log_dir.glob("*.log"))
        )


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()


PipelineEnv = Callable[..., dict[str, str]]
"""What ``pipeline_env`` gives: ``process_env`` with the test's servers, given more variables."""


@pytest.fixture
def pipeline_env(database_url: str, redis_url: str) -> PipelineEnv:
    """``process_env`` on the test's database and Redis with the webhook secret ``SECRET``;
    more variables as keywords."""

    def build(**overrides: str) -> dict[str, str]:
        return process_env(
            DATABASE_URL=database_url,
            REDIS_URL=redis_url,
            VOUCHERIFY_WEBHOOK_SECRET=SECRET,
            **overrides,
        )

    return build


@pytest.fixture
def pipeline_port(processes: Processes, pipeline_env: PipelineEnv) -> int:
    """The port of a web process with a worker behind it, both on ``pipeline_env()``."""
    env = pipeline_env()
    _, port = processes.web(env)
    processes.worker(env)
    return port
