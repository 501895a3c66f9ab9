"""Logs and metrics of the real processes (gunicorn web, celery worker), as an operator's
log shipper and Prometheus see them."""

from __future__ import annotations

import contextlib
import json
import socket
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools.servers import free_port, wait_for_port
from devtools.webhooks import (
    SECRET,
    body_of,
    card_redemption,
    envelope,
    fixture,
    sign,
    wait_until,
)
from tests.conftest import PipelineEnv, Processes, http_call, process_env
from tests.ops.conftest import TOKEN
from workers.observability import start_metrics_server
from workers.queue import DeliveryPublisher

pytestmark = pytest.mark.e2e

MARKER = "PAYLOAD-MARKER-7f3a9c"
"""A value only the webhook body holds: it must never reach a log line."""


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    response, raw = http_call(port, method, path, body, headers)
    return response.status, json.loads(raw) if raw.startswith(b"{") else {}


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def other_local_addresses() -> list[str]:
    """Addresses of this machine other than 127.0.0.1: 127.0.0.2 (all of 127/8 is local
    on Linux) and the one outbound traffic leaves from, when there is a route."""
    found = ["127.0.0.2"]
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe,
    ):
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent
        address = probe.getsockname()[0]
        if not address.startswith("127."):
            found.append(address)
    return found


def post_webhook(port: int, body: bytes, signature: str) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json", "x-voucherify-signature": signature}
    return request(port, "POST", "/webhooks/voucherify", body, headers)


def status_of(db: psycopg.Connection[Any], event_id: str) -> str | None:
    row = db.execute("SELECT status FROM events WHERE event_id = %s", (event_id,)).fetchone()
    return row[0] if row else None


def log_records(log_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Every line of every process's output, parsed; fails on a line that is not JSON."""
    records: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(log_dir.glob("*.log")):
        records[path.name] = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                pytest.fail(f"{path.name}:{number} is not JSON: {line[:200]!r}")
            assert isinstance(record, dict), f"{path.name}:{number} is not an object"
            records[path.name].append(record)
    return records


def test_every_log_line_is_json_names_the_delivery_and_holds_no_body_or_secret(
    processes: Processes, pipeline_env: PipelineEnv, db: psycopg.Connection[Any]
) -> None:
    env = pipeline_env(OPS_API_TOKEN=TOKEN, WORKER_METRICS_PORT="0")
    _, port = processes.web(env)
    processes.worker(env)

    data = card_redemption("gift", "r_logs", amount=1500, balance_after=500)
    data["order"]["metadata"] = {"note": MARKER}
    body = body_of(envelope("redemption.succeeded", data, event_id="ev_logs_1"))
    signature = sign(body)
    status, answer = post_webhook(port, body, signature)
    assert status == 202
    delivery_id = answer["delivery_id"]
    forged = sign(body, "not-the-secret")
    assert post_webhook(port, body, forged)[0] == 401
    # A dead letter too: its reason is logged, its body is not.
    bad = fixture("redemption.succeeded")
    bad["redemption"]["amount"] = MARKER
    bad_body = body_of(envelope("redemption.succeeded", bad, event_id="ev_logs_bad"))
    assert post_webhook(port, bad_body, sign(bad_body))[0] == 202
    # Ops requests, with the token and with a wrong one.
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert request(port, "GET", "/ops/api/events/ev_logs_1", headers=auth)[0] in (200, 404)
    assert request(port, "GET", "/ops/api/flags", headers={"Authorization": "Bearer x"})[0] == 401

    wait_until(lambda: status_of(db, "ev_logs_1") == "processed", what="the event processed")
    wait_until(lambda: status_of(db, "ev_logs_bad") == "dead", what="the bad event dead")
    wait_until(
        lambda: sum(
            '"event.dead"' in p.read_text() for p in processes.log_dir.glob("worker-*.log")
        ),
        what="the worker's log lines",
    )

    processes.stop_all()  # their shutdown lines count too
    records = log_records(processes.log_dir)
    assert set(records) == {"web-0.log", "worker-1.log"}
    assert records["web-0.log"]
    assert records["worker-1.log"]

    # Every line that mentions the delivery carries it, its event id and type as fields.
    about = [r for lines in records.values() for r in lines if delivery_id in json.dumps(r)]
    assert about, "no line about the delivery"
    for record in about:
        assert record["delivery_id"] == delivery_id, record
        assert record["event_id"] == "ev_logs_1", record
        assert record["type"] == "redemption.succeeded", record
    assert [r["event"] for r in about] == ["event.processed"]
    (dead,) = [r for r in records["worker-1.log"] if r.get("event") == "event.dead"]
    assert (dead["event_id"], dead["type"]) == ("ev_logs_bad", "redemption.succeeded")
    assert dead["delivery_id"]
    assert any(r.get("event") == "delivery.rejected" for r in records["web-0.log"])
    assert any(r.get("event") == "ops.unauthorized" for r in records["web-0.log"])

    # Never a body, a signature or a secret.
    everything = "\n".join(p.read_text() for p in processes.log_dir.glob("*.log"))
    for secret in (MARKER, signature, forged, SECRET, TOKEN, body.decode()[:60]):
        assert secret not in everything, f"{secret[:20]}... appears in the logs"


def test_the_worker_serves_its_metrics_from_every_pool_process(
    processes: Processes, database_url: str, redis_url: str, db: psycopg.Connection[Any]
) -> None:
    metrics_port = free_port()
    env = process_env(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        WORKER_METRICS_PORT=str(metrics_port),
    )
    processes.worker(env, concurrency=2)
    publisher = DeliveryPublisher(redis_url, 5.0)
    good = fixture("redemption.succeeded")
    bad = fixture("redemption.succeeded")
    bad["redemption"]["amount"] = "a lot"
    for n in range(4):
        document = envelope("redemption.succeeded", good, event_id=f"ev_metrics_{n}")
        publisher.publish(body_of(document).decode(), f"d_metrics_{n}", "2024-02-01T10:30:00+00:00")
    bad_document = envelope("redemption.succeeded", bad, event_id="ev_metrics_bad")
    publisher.publish(body_of(bad_document).decode(), "d_metrics_bad", "2024-02-01T10:30:00+00:00")
    publisher.close()
    wait_until(
        lambda: (
            db.execute(
                "SELECT count(*) FROM events WHERE status IN ('processed', 'dead')"
            ).fetchone()
            == (5,)
        ),
        what="five events finished",
    )
    wait_for_port(metrics_port, timeout=30)

    def samples() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }

    values = samples()
    processed = 'worker_events_total{outcome="processed",type="redemption.succeeded"}'
    assert values[processed] == 4  # four events, counted by whichever child ran each
    assert values['worker_events_total{outcome="dead",type="redemption.succeeded"}'] == 1
    assert values['worker_dead_letters_total{type="redemption.succeeded"}'] == 1
    assert values["worker_processing_seconds_count"] == 5
    assert values["worker_end_to_end_lag_seconds_count"] == 5
    assert "worker_retries_total" in values
    assert [a for a in other_local_addresses() if reachable(a, metrics_port)] == []


def test_the_worker_metrics_server_listens_on_loopback_unless_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    port = free_port()
    server = start_metrics_server(port)
    assert server is not None
    try:
        assert server.server_address[:2] == ("127.0.0.1", port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert r.status == 200
        others = other_local_addresses()
        assert [a for a in others if reachable(a, port)] == []
    finally:
        server.shutdown()
        server.server_close()

    told = start_metrics_server(free_port(), host="127.0.0.2")
    assert told is not None
    try:
        assert told.server_address[0] == "127.0.0.2"
        assert reachable("127.0.0.2", told.server_address[1])
        assert not reachable("127.0.0.1", told.server_address[1])
    finally:
        told.shutdown()
        told.server_close()
