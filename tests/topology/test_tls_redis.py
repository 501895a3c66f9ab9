"""Every process over ``rediss://`` to a Redis with a self-signed certificate (Heroku Redis).

With ``ssl_cert_reqs=none`` in ``REDIS_URL`` the whole flow works: the web's receiver and
``/readyz``, the worker, beat and the jobs it schedules, the ops API and the CLI. Without
it the certificate is verified, and refused: the receiver answers 503, nothing is stored.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from kombu.exceptions import OperationalError

from config.settings import Settings
from devtools.webhooks import SECRET, body_of, card_redemption, envelope, wait_until
from tests.conftest import ROOT, Processes, http_call, post_signed, process_env, run_captured
from tests.topology.conftest import TlsRedis
from workers.celery_app import make_celery
from workers.db import close_pool
from workers.jobs.runner import run_job
from workers.queue import ACCEPTED_HASH, DELIVERY_QUEUE, BrokerUnavailable, DeliveryPublisher

pytestmark = pytest.mark.e2e

OPS_TOKEN = "topology-ops-token-0123456789abcdef"  # at least 32 characters
REFUSED = "certificate verify failed"


def env_for(database_url: str, redis_url: str, **more: str) -> dict[str, str]:
    return process_env(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        VOUCHERIFY_WEBHOOK_SECRET=SECRET,
        WORKER_METRICS_PORT="0",  # no fixed port: other test runs may share the machine
        **more,
    )


def post_redemption(
    port: int, redemption_id: str, amount: int, balance_after: int, event_id: str
) -> tuple[int, dict[str, Any], str | None]:
    """A gift card redemption's webhook, signed: the status, JSON answer and Retry-After."""
    data = card_redemption("gift", redemption_id, amount=amount, balance_after=balance_after)
    doc = envelope("redemption.succeeded", data, event_id=event_id)
    response, raw = post_signed(port, body_of(doc))
    return response.status, json.loads(raw or b"{}"), response.getheader("Retry-After")


def get_json(port: int, path: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response, raw = http_call(port, "GET", path, headers=headers)
    return response.status, json.loads(raw)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``vfy-pipeline`` (the console script's module) in a process of its own."""
    return run_captured([sys.executable, "-m", "ops.cli", *args], env, ROOT)


def test_every_process_works_over_tls_with_ssl_cert_reqs_none(
    processes: Processes,
    database_url: str,
    db: psycopg.Connection[Any],
    tls_redis: TlsRedis,
    tmp_path: Path,
) -> None:
    url = tls_redis.url("ssl_cert_reqs=none")  # Heroku's documented form
    env = env_for(database_url, url, OPS_API_TOKEN=OPS_TOKEN, REDRIVE_INTERVAL_SECONDS="1")
    _, port = processes.web(env)
    processes.worker(env)
    processes.beat(env, tmp_path / "beat-schedule")

    wait_until(
        lambda: get_json(port, "/readyz")[0] == 200,
        timeout=30,
        what=lambda: f"/readyz 200 over TLS: {get_json(port, '/readyz')}\n{processes.logs()}",
    )
    status, payload, _ = post_redemption(port, "r_tls", 1500, 8500, "evred_tls_1")
    assert status == 202, payload

    def processed() -> bool:
        row = db.execute("SELECT status FROM events WHERE event_id = 'evred_tls_1'").fetchone()
        return row is not None and row[0] == "processed"

    wait_until(processed, timeout=60, what=lambda: "event processed\n" + processes.logs())
    assert db.execute("SELECT status FROM redemptions").fetchall() == [("SUCCEEDED",)]
    assert db.execute("SELECT kind, amount FROM ledger_entries").fetchall() == [
        ("gift_credit", -1500)
    ]
    client = tls_redis.client()
    try:
        # The worker's own clients (process_client) forgot the accepted copy.
        wait_until(lambda: client.hlen(ACCEPTED_HASH) == 0, timeout=10, what="copy forgotten")
    finally:
        client.close()

    # beat sent the re-drive job through the broker, a worker ran it: both over TLS.
    def redrive_ran() -> bool:
        row = db.execute("SELECT count(*) FROM job_runs WHERE job = 'redrive'").fetchone()
        return row is not None and row[0] >= 1

    wait_until(redrive_ran, timeout=60, what=lambda: "a scheduled redrive run\n" + processes.logs())

    # The ops API and the CLI read the queue depths through their own Redis clients.
    status, stats = get_json(port, "/ops/api/stats", OPS_TOKEN)
    assert status == 200, stats
    assert stats["queue_depth"] is not None, stats
    result = cli(env, "stats", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["queue_depth"] is not None, result.stdout

    # The worker's and beat's start-up check read the broker's settings over TLS.
    logs = "\n".join(path.read_text(errors="replace") for path in tmp_path.glob("*.log"))
    assert "broker.durability_warning" in logs  # this Redis runs without appendonly
    assert "cannot reach the broker" not in logs
    assert REFUSED not in logs


def test_without_ssl_cert_reqs_the_self_signed_certificate_is_refused(
    processes: Processes,
    database_url: str,
    tls_redis: TlsRedis,
) -> None:
    env = env_for(
        database_url, tls_redis.url(), OPS_API_TOKEN=OPS_TOKEN, ENQUEUE_TIMEOUT_SECONDS="1"
    )
    _, port = processes.web(env)
    status, payload, retry_after = post_redemption(
        port, "r_tls_refused", 100, 900, "evred_tls_refused"
    )
    assert status == 503, payload
    assert retry_after is not None

    status, ready = get_json(port, "/readyz")
    assert status == 503
    assert "redis" in json.dumps(ready["failed"]), ready

    result = cli(env, "stats", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["queue_depth"] is None

    assert REFUSED in processes.logs()  # a clear reason, not a silent downgrade
    client = tls_redis.client()
    try:
        assert client.llen(DELIVERY_QUEUE) == 0
        assert client.hlen(ACCEPTED_HASH) == 0
    finally:
        client.close()


@pytest.mark.parametrize("query", ["", "ssl_cert_reqs=required", "ssl_cert_reqs=optional"])
def test_verification_refuses_the_certificate_in_every_client(
    tls_redis: TlsRedis, query: str
) -> None:
    url = tls_redis.url(query)
    publisher = DeliveryPublisher(url, budget_seconds=0.3)
    try:
        with pytest.raises(BrokerUnavailable, match=REFUSED):
            publisher.publish("{}", "d_refused", "2024-01-01T00:00:00+00:00")
        with pytest.raises(redis.ConnectionError, match=REFUSED):
            publisher.ping()
    finally:
        publisher.close()

    # The worker's and beat's broker connection (kombu, broker_use_ssl).
    app = make_celery(Settings.from_env({"DATABASE_URL": "postgresql://h/d", "REDIS_URL": url}))
    with app.connection_for_write() as conn, pytest.raises(OperationalError, match=REFUSED):
        conn.ensure_connection(max_retries=0)


@pytest.mark.parametrize(
    "query", ["ssl_cert_reqs=none", "ssl_cert_reqs=required&ssl_ca_certs={ca}", "ssl_ca_certs={ca}"]
)
def test_the_certificate_is_accepted_when_the_url_says_how(
    tls_redis: TlsRedis, database_url: str, query: str
) -> None:
    url = tls_redis.url(query.format(ca=tls_redis.certificate.cert))
    publisher = DeliveryPublisher(url, budget_seconds=2)
    try:
        assert publisher.ping()
        publisher.publish("{}", "d_tls", "2024-01-01T00:00:00+00:00")
    finally:
        publisher.close()
    client = tls_redis.client()
    try:
        assert client.llen(DELIVERY_QUEUE) == 1
    finally:
        client.close()

    settings = Settings.from_env({"DATABASE_URL": database_url, "REDIS_URL": url})
    app = make_celery(settings)
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=0)
        assert conn.default_channel.client.ping()

    # A job, run as the scheduled task runs it (its own redis-py client of the URL).
    try:
        assert run_job("redrive", settings)["status"] == "succeeded"
    finally:
        close_pool()
