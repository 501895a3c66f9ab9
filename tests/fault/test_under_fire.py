"""Proof under fire: the whole pipeline keeps every accepted delivery while it is shot at.

The processes of the Procfile (web with two gunicorn workers, two Celery workers, beat)
run against their own PostgreSQL and Redis (AOF on, ``appendfsync everysec``, no
eviction: the README's settings). A stream of signed deliveries built from the published
payloads (``devtools/stream.py``: gift and loyalty card redemptions, rollbacks and failed
rollbacks, 10 % duplicates, 5 % rollbacks sent before their redemption) is POSTed at a
steady rate, retried as Voucherify retries (503 or no answer: again after a pause; a 202
never). While it runs, at fixed points of the stream:

1. one worker's whole process group is SIGKILLed, and a new worker started;
2. web gets SIGTERM, exits, and a new web is started (the sender moves to it);
3. Redis is shut down (graceful SHUTDOWN: AOF flushed) for 5 s and started again on the
   same port and data folder;
4. PostgreSQL is stopped for 20 s; halfway through, the other worker (holding retries) is
   SIGKILLed too; once PostgreSQL is back, Redis is restarted again (2 s) while the
   workers drain the backlog with full prefetch windows.

Then, once the pipeline has settled: every delivery answered 202 is recorded, every event
is processed exactly once (one debit per redemption, one restore per rollback, one flag
per failed rollback), the ledger totals per customer and card kind equal the expected
ones to the unit, no answer was a 5xx other than the 503s of the Redis restarts, nothing
is left in the queues, in the accepted set or unfinished in the inbox, and every process
is running. Nothing is lost, also not a message in flight to a worker at a SIGKILL or a
Redis restart: kombu's transport takes a message off the queue (BRPOP) before it records
it as unacknowledged, and earlier runs lost one now and then in that window; the
receiver's accepted set and the re-drive job's sweep (``workers/queue/accepted.py``) now bring
it back. The test prints a short report and writes per-request and per-event records to
``tests/artifacts/`` for ``bench.figures`` to plot.

``UNDER_FIRE_DELIVERIES`` (default 3000) and ``UNDER_FIRE_RATE`` (deliveries per second,
default 40) size the run.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from devtools.sender import CONNECTION_ERROR, Sender, percentile
from devtools.stream import Stream, build_stream
from devtools.webhooks import SECRET, wait_until
from tests.conftest import Processes, process_env
from tests.fault.servers import Servers, started_servers, unacked
from workers.queue import ACCEPTED_HASH, DELIVERY_QUEUE, PARKED_QUEUE

pytestmark = pytest.mark.fault

DELIVERIES = int(os.environ.get("UNDER_FIRE_DELIVERIES", "3000"))
RATE = float(os.environ.get("UNDER_FIRE_RATE", "40"))
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
REDIS_BACKLOG_DOWN_SECONDS = 2.0
REDIS_DOWN_SECONDS = 5.0  # as long as the receiver's enqueue budget: some 503s, then retries
POSTGRES_DOWN_SECONDS = 20.0
ENQUEUE_TIMEOUT_SECONDS = 5
UNRECORDED = "accepted, not recorded"


@pytest.fixture
def servers() -> Iterator[Servers]:
    with started_servers("vfy-under-fire-") as servers:
        yield servers


@dataclass(frozen=True)
class Fault:
    name: str
    start: float
    end: float
    """Seconds since the sender started."""


class Fire:
    """The processes under test and the faults done to them."""

    def __init__(self, servers: Servers, processes: Processes, tmp_path: Path) -> None:
        self.servers = servers
        self.processes = processes
        self.env = process_env(
            DATABASE_URL=servers.postgres.url(),
            REDIS_URL=servers.redis.url(),
            VOUCHERIFY_WEBHOOK_SECRET=SECRET,
            WEB_CONCURRENCY="2",
            ENQUEUE_TIMEOUT_SECONDS=str(ENQUEUE_TIMEOUT_SECONDS),
            # Short horizons, so redelivery, retries and re-drives happen within the run.
            BROKER_VISIBILITY_TIMEOUT_SECONDS="15",
            RETRY_BACKOFF_MAX_SECONDS="5",
            EVENT_MAX_RETRIES="30",
            REDRIVE_INTERVAL_SECONDS="5",
            REDRIVE_AFTER_SECONDS="20",
            WORKER_METRICS_PORT="0",  # several workers on one host
        )
        self.web, self.port = processes.web(self.env)
        self.workers = [processes.worker(self.env), processes.worker(self.env)]
        self.beat = processes.beat(self.env, tmp_path / "beat-schedule")
        self.web_exit_codes: list[int] = []
        self.faults: list[Fault] = []
        self.unacked_at_kill: list[int] = []
        self.unacked_at_restart = 0

    def _record(self, name: str, sender: Sender, act: Callable[[], None]) -> Fault:
        start = sender.elapsed()
        act()
        fault = Fault(name, start, sender.elapsed())
        self.faults.append(fault)
        return fault

    def kill_worker(self, sender: Sender) -> None:
        """SIGKILL the oldest worker's process group (main process and pool), start another."""

        def act() -> None:
            victim = self.workers.pop(0)
            self.unacked_at_kill.append(unacked(self.servers.redis.url()))
            os.killpg(victim.pid, signal.SIGKILL)  # no clean-up at all
            victim.wait(timeout=10)
            self.workers.append(self.processes.worker(self.env))

        self._record("SIGKILL worker", sender, act)

    def restart_web(self, sender: Sender) -> None:
        def act() -> None:
            self.web.send_signal(signal.SIGTERM)
            self.web_exit_codes.append(self.web.wait(timeout=30))
            self.web, self.port = self.processes.web(self.env)
            sender.set_port(self.port)

        self._record("SIGTERM + restart web", sender, act)

    def restart_redis(self, sender: Sender) -> None:
        def act() -> None:
            self.servers.redis.stop()  # SHUTDOWN: the AOF is written out (a planned restart)
            time.sleep(REDIS_DOWN_SECONDS)  # the outage itself
            self.servers.redis.start()

        self._record(f"Redis down {REDIS_DOWN_SECONDS:g} s", sender, act)

    def stop_postgres(self, sender: Sender) -> None:
        """PostgreSQL down; halfway through, the oldest worker, holding retries, is killed."""
        start = sender.elapsed()
        self.servers.postgres.stop(mode="fast")
        time.sleep(POSTGRES_DOWN_SECONDS / 2)  # the outage itself
        self.kill_worker(sender)
        time.sleep(POSTGRES_DOWN_SECONDS / 2)
        self.servers.postgres.start()
        self.faults.append(
            Fault(f"PostgreSQL down {POSTGRES_DOWN_SECONDS:g} s", start, sender.elapsed())
        )
        # The workers now drain the backlog with full prefetch windows: restart Redis under
        # them (their late acks fail; they must go on consuming: compat/kombu_redis.py).
        deadline = time.monotonic() + 5
        while unacked(self.servers.redis.url()) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)  # polling for a full window, not waiting for a result
        self.unacked_at_restart = unacked(self.servers.redis.url())

        def act() -> None:
            self.servers.redis.stop()
            time.sleep(REDIS_BACKLOG_DOWN_SECONDS)  # the outage itself
            self.servers.redis.start()

        self._record(f"Redis down {REDIS_BACKLOG_DOWN_SECONDS:g} s (backlog)", sender, act)

    def alive(self) -> dict[str, bool]:
        procs = {"web": self.web, "beat": self.beat}
        procs.update({f"worker-{i}": w for i, w in enumerate(self.workers)})
        return {name: proc.poll() is None for name, proc in procs.items()}


@pytest.fixture
def fire(servers: Servers, processes: Processes, tmp_path: Path) -> Fire:
    return Fire(servers, processes, tmp_path)


def query(url: str, sql: str, params: dict[str, Any] | None = None) -> list[Any]:
    with psycopg.connect(url, connect_timeout=3) as conn:
        return conn.execute(sql, params).fetchall()


def ledger_totals(url: str) -> dict[tuple[str, str], int]:
    """The ledger's sum of each (customer, kind)."""
    return {
        (c, k): int(t)
        for c, k, t in query(
            url, "SELECT customer_id, kind, sum(amount) FROM ledger_entries GROUP BY 1, 2"
        )
    }


def pipeline_state(url: str, redis_url: str, accepted_ids: list[str]) -> dict[str, int]:
    """What is not finished yet; all zeros once the pipeline has settled. A repeat of an
    event is answered with the delivery id of its first copy: ids count once each."""
    accepted_ids = sorted(set(accepted_ids))
    try:
        (recorded, unfinished), *_ = query(
            url,
            "SELECT (SELECT count(*) FROM deliveries WHERE delivery_id = ANY(%(ids)s)),"
            " (SELECT count(*) FROM events WHERE status IN ('received', 'failed'))",
            {"ids": accepted_ids},
        )
        client = redis.Redis.from_url(redis_url)
        try:
            return {
                UNRECORDED: len(accepted_ids) - int(recorded),
                "events received or failed": int(unfinished),
                "queued": int(client.llen(DELIVERY_QUEUE)),
                "parked": int(client.llen(PARKED_QUEUE)),
                # kombu: messages a worker took and has not acknowledged yet
                "unacknowledged": int(client.hlen("unacked")),
                # accepted copies not yet forgotten by a worker or swept by the re-drive job
                "accepted, not forgotten": int(client.hlen(ACCEPTED_HASH)),
            }
        finally:
            client.close()
    except (psycopg.OperationalError, redis.RedisError) as exc:
        return {f"unreachable: {exc}": 1}


def settled_probe(
    url: str, redis_url: str, accepted_ids: list[str], state: dict[str, int]
) -> Callable[[], bool]:
    """A ``wait_until`` condition: True once every accepted delivery is recorded, or once
    nothing has been queued, parked, in a worker's hands or unfinished in the inbox for
    5 s (what is still not recorded can no longer arrive). ``state`` holds the last look."""
    quiet: list[float] = []

    def settled() -> bool:
        state.clear()
        state.update(pipeline_state(url, redis_url, accepted_ids))
        if any(n for what, n in state.items() if what != UNRECORDED):
            quiet.clear()
            return False
        if not state.get(UNRECORDED):
            return True
        quiet.append(time.monotonic())
        return quiet[-1] - quiet[0] >= 5

    return settled


def where_are(url: str, redis_url: str, sender: Sender, accepted: dict[int, Any]) -> list[str]:
    """For each accepted delivery not recorded: when it was sent and where Redis has it."""
    ids = {a.delivery_id: i for i, a in accepted.items() if a.delivery_id}
    recorded = {
        r[0]
        for r in query(
            url,
            "SELECT delivery_id FROM deliveries WHERE delivery_id = ANY(%(ids)s)",
            {"ids": list(ids)},
        )
    }
    client = redis.Redis.from_url(redis_url)
    try:
        queued = b"".join(client.lrange(DELIVERY_QUEUE, 0, -1) or [])
        parked = b"".join(client.lrange(PARKED_QUEUE, 0, -1) or [])
        unacked_raw = b"".join(client.hvals("unacked") or [])
        copies = set(client.hkeys(ACCEPTED_HASH) or [])
    finally:
        client.close()
    lines = []
    for delivery_id, index in ids.items():
        if delivery_id in recorded:
            continue
        final = accepted[index]
        tries = [a for a in sender.attempts if a.index == index]
        places = [
            name
            for name, raw in (("queued", queued), ("parked", parked), ("unacked", unacked_raw))
            if delivery_id.encode() in raw  # the task id is the delivery id, in plain text
        ]
        if delivery_id.encode() in copies:
            places.append("accepted set")
        lines.append(
            f"delivery {delivery_id} (stream index {index}, "
            f"event {sender.deliveries[index].event_id}): 202 at "
            f"{final.sent_at + final.ack_ms / 1000:.2f} s after {len(tries)} attempt(s); "
            f"in Redis: {places or 'nowhere'}"
        )
    return lines


def reached(sender: Sender, deliveries: int) -> Callable[[], bool]:
    return lambda: sender.taken >= deliveries


LOGGED = (
    "delivery.retry",
    "delivery.parked",
    "delivery.enqueue_failed",
    "delivery.enqueue_gave_up",
    "redrive.event",
    "redrive.unparked",
    "redrive.dead_lettered",
)


def read_logs(log_dir: Path) -> tuple[Counter[str], Counter[str]]:
    """``event.processed`` lines per event id, and the count of each ``LOGGED`` event."""
    processed: Counter[str] = Counter()
    notable: Counter[str] = Counter()
    for path in log_dir.glob("*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            event = record.get("event")
            if event == "event.processed":
                processed[str(record.get("event_id"))] += 1
            elif event in LOGGED:
                notable[str(event)] += 1
    return processed, notable


def write_csv(name: str, header: list[str], records: Iterable[list[Any]]) -> None:
    with (ARTIFACTS / name).open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(records)


def write_artifacts(sender: Sender, faults: list[Fault], lag_rows: list[Any]) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    start = sender.started_wall
    attempts = sorted(sender.attempts, key=lambda a: a.sent_at)
    write_csv(
        "under_fire_requests.csv",
        ["t_s", "ack_ms", "status", "index", "attempt"],
        ([f"{a.sent_at:.4f}", f"{a.ack_ms:.2f}", a.status, a.index, a.attempt] for a in attempts),
    )
    write_csv(
        "under_fire_lag.csv",
        ["received_t_s", "processed_t_s", "lag_ms", "event_id"],
        (
            [
                f"{float(received) - start:.4f}",
                f"{float(processed) - start:.4f}",
                f"{(float(processed) - float(received)) * 1000:.1f}",
                event_id,
            ]
            for event_id, received, processed in sorted(lag_rows, key=lambda r: r[1])
        ),
    )
    write_csv(
        "under_fire_faults.csv",
        ["fault", "start_s", "end_s"],
        ([fault.name, f"{fault.start:.3f}", f"{fault.end:.3f}"] for fault in faults),
    )


@pytest.mark.timeout(600)
def test_every_accepted_delivery_is_applied_exactly_once_under_fire(
    fire: Fire, servers: Servers, processes: Processes, capsys: pytest.CaptureFixture[str]
) -> None:
    stream: Stream = build_stream(DELIVERIES, seed=2024, prefix="fire")
    url, redis_url = servers.postgres.url(), servers.redis.url()
    sender = Sender(stream.deliveries, fire.port, threads=32, rate=RATE, retry_pause=0.5)
    schedule: list[tuple[float, Callable[[Sender], None]]] = [
        (0.15, fire.kill_worker),
        (0.30, fire.restart_web),
        (0.45, fire.restart_redis),
        (0.60, fire.stop_postgres),  # with a worker SIGKILLed while it holds retries
    ]

    sender.start()
    for fraction, act in schedule:
        wait_until(
            reached(sender, int(DELIVERIES * fraction)),
            timeout=DELIVERIES / RATE + 60,
            interval=0.05,
            what=f"{fraction:.0%} of the deliveries to be sent",
        )
        act(sender)
    assert sender.join(timeout=DELIVERIES / RATE + 120), "the sender did not finish"
    last_sent = max(a.sent_at + a.ack_ms / 1000 for a in sender.attempts)

    accepted = sender.accepted()
    accepted_ids = [a.delivery_id for a in accepted.values() if a.delivery_id]
    state: dict[str, int] = {}
    settled = settled_probe(url, redis_url, accepted_ids, state)

    try:
        # Longer than kombu's restore lock (unacked_mutex_expire, 300 s), so that a worker
        # killed while holding it delays the redelivery of unacknowledged messages, but
        # does not fail the test as a loss.
        wait_until(settled, timeout=360, interval=0.5, what="the pipeline to settle")
    except AssertionError as exc:
        write_artifacts(sender, sorted(fire.faults, key=lambda f: f.start), [])
        missing = where_are(url, redis_url, sender, accepted)
        faults = [f"{f.start:.1f}-{f.end:.1f} s {f.name}" for f in fire.faults]
        raise AssertionError(
            f"{exc}: {state}\nfaults: {faults}\nlogs: {processes.log_dir}\n"
            + "\n".join(missing[:20])
        ) from None
    settled_at = sender.elapsed()
    alive = fire.alive()
    lost = where_are(url, redis_url, sender, accepted)

    # --- what the database says -------------------------------------------------------
    events = dict(query(url, "SELECT event_id, status FROM events"))
    ledger = query(url, "SELECT redemption_id, effect, count(*) FROM ledger_entries GROUP BY 1, 2")
    totals = ledger_totals(url)
    flags = dict(query(url, "SELECT event_id, count(*) FROM flags GROUP BY 1"))
    redemption_status = dict(query(url, "SELECT redemption_id, status FROM redemptions"))
    dead_letters = query(url, "SELECT event_id, reason FROM dead_letters")
    outcomes = dict(query(url, "SELECT outcome, count(*) FROM deliveries GROUP BY 1"))
    lag_rows = query(
        url,
        "SELECT e.event_id, extract(epoch FROM min(d.received_at)),"
        " extract(epoch FROM e.processed_at)"
        " FROM events e JOIN deliveries d USING (event_id)"
        " WHERE e.processed_at IS NOT NULL GROUP BY e.event_id, e.processed_at",
    )
    logged, notable = read_logs(processes.log_dir)
    fire.faults.sort(key=lambda f: f.start)
    recorded_ids = {
        r[0]
        for r in query(
            url,
            "SELECT delivery_id FROM deliveries WHERE delivery_id = ANY(%(ids)s)",
            {"ids": accepted_ids},
        )
    }
    lost_at = {i: a for i, a in accepted.items() if a.delivery_id not in recorded_ids}
    accepted_events = {stream.deliveries[i].event_id for i in accepted}
    # An event is lost only when every accepted delivery of it was.
    applied_events = {stream.deliveries[i].event_id for i in accepted if i not in lost_at}

    # --- the report -------------------------------------------------------------------
    write_artifacts(sender, fire.faults, lag_rows)
    acks = [a.ack_ms for a in sender.attempts if a.status != CONNECTION_ERROR]
    lags = [(float(p) - float(r)) * 1000 for _, r, p in lag_rows]
    histogram = sender.status_histogram()
    mix = stream.mix()
    report = [
        "",
        f"under fire: {mix['deliveries']} deliveries at {RATE:g}/s "
        f"({mix['events']} events: {mix['redemptions']} redemptions, {mix['rollbacks']} "
        f"rollbacks, {mix['rollback_failures']} failed rollbacks; {mix['duplicates']} "
        f"duplicates, {mix['out_of_order']} out of order)",
        f"  requests {len(sender.attempts)}: {histogram}",
        f"  accepted (202) {len(accepted)}, abandoned {len(sender.outcome.abandoned)}",
        f"  ack ms: p50 {percentile(acks, 50):.1f}, p99 {percentile(acks, 99):.1f}, "
        f"max {max(acks):.0f}",
        f"  lag ms: p50 {percentile(lags, 50):.0f}, p99 {percentile(lags, 99):.0f}, "
        f"max {max(lags):.0f}",
        f"  stream ended at {last_sent:.1f} s, settled at {settled_at:.1f} s",
        f"  events {Counter(events.values())}, delivery outcomes {outcomes}, "
        f"dead letters {len(dead_letters)}",
        f"  processes alive at the end: {alive}, web exit codes on SIGTERM {fire.web_exit_codes}",
        "  faults:",
        *(f"    {f.start:6.1f} s - {f.end:6.1f} s  {f.name}" for f in fire.faults),
        f"  messages unacknowledged in Redis when a worker was killed: {fire.unacked_at_kill}, "
        f"when Redis was restarted under the backlog: {fire.unacked_at_restart}",
        f"  logged: {dict(sorted(notable.items()))}",
        f"  LOST, answered 202 but never applied: {len(lost_at)} deliveries, "
        f"{len(accepted_events - applied_events)} events",
        *(f"    {line}" for line in lost),
        f"  records: {ARTIFACTS.relative_to(ARTIFACTS.parents[1])}/under_fire_*.csv",
    ]
    with capsys.disabled():
        print("\n".join(report))

    # --- the proof --------------------------------------------------------------------
    assert not sender.outcome.abandoned, "deliveries never answered 202"
    assert {a.status for a in sender.outcome.final.values()} == {202}
    assert accepted_events == stream.event_ids

    # Nothing lost: every delivery answered 202 reached the inbox.
    assert not lost_at, lost

    # Every event applied, exactly once.
    assert set(events) == applied_events
    assert set(events.values()) == {"processed"}, Counter(events.values())
    assert not dead_letters
    assert all(n == 1 for n in logged.values()), {e: n for e, n in logged.items() if n > 1}
    effects = {e: stream.effects[e] for e in applied_events if e in stream.effects}
    debits = {eff.redemption_id for e, eff in effects.items() if e in stream.redemptions}
    restores = {eff.redemption_id for e, eff in effects.items() if e in stream.rollbacks}
    assert {(r, "debit") for r in debits} | {(r, "restore") for r in restores} == {
        (r, effect) for r, effect, _ in ledger
    }
    assert {n for _, _, n in ledger} == {1}
    assert totals == stream.expected_totals(applied_events)
    assert flags == dict.fromkeys(stream.rollback_failures & applied_events, 1)
    assert {r for r, s in redemption_status.items() if s == "ROLLED_BACK"} == restores
    assert {r for r, s in redemption_status.items() if s == "SUCCEEDED"} == debits - restores

    # No 5xx but the 503s of the Redis restart; every process still (or again) running.
    errors = [a for a in sender.attempts if a.status >= 500 and a.status != 503]
    assert not errors, errors[:5]
    redis_faults = [f for f in fire.faults if f.name.startswith("Redis")]
    stray_503 = [
        a
        for a in sender.attempts
        if a.status == 503
        and not any(f.start <= a.sent_at + a.ack_ms / 1000 <= f.end + 2 for f in redis_faults)
    ]
    assert not stray_503, stray_503[:5]
    assert all(alive.values()), alive
    assert fire.web_exit_codes == [0]
