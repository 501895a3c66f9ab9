"""Many instances: the Procfile's processes scaled out on one machine, and still exactly once.

A platform runs a formation, not a process: here 2 ``web`` (``python -m web.serve``, each
on its own port), 3 ``worker`` (``celery ... worker``, each with its own ``--hostname``)
and 1 ``beat``, on their own PostgreSQL and Redis, with the jobs every second
(``REDRIVE_INTERVAL_SECONDS``, ``DRIFT_INTERVAL_SECONDS``, ``RETENTION_INTERVAL_SECONDS``)
so that they run, and contend, during the test. The fault suite's stream
(``devtools/stream.py``: redemptions, rollbacks, failed rollbacks, 10 % duplicates, 5 %
rollbacks before their redemption), plus a twin of every 25th delivery sent right after
it, is POSTed at a steady rate and spread over the two webs as a round-robin load balancer
does (``devtools/sender.py``): a twin, a duplicate or a retry often reaches the other
web, so two webs accept the same body and two workers may hold the same event at once.
While it runs:

1. a worker's whole process group is SIGKILLed (at a moment no job is in a worker's
   hands, so that no job lock outlives its run), and a worker with the same hostname is
   started again;
2. a second ``beat`` is started, as a misconfigured formation would (``beat: 2``), and
   runs until both beats have sent every job several times; meanwhile the drift and
   retention runs are made to last 0.7 s (a trigger sleeps in the insert of their
   ``job_runs`` row, under the lock), longer than half their 1 s interval, so that
   whatever the two beats' phase, each sends while the other's run holds the lock (with
   the real runs of a few milliseconds, two beats would collide only by chance); then it
   gets SIGTERM;
3. one web gets SIGTERM and is started again on a new port (a rolling deploy), the other
   taking the requests meanwhile.

Then, once the pipeline has settled: every delivery was answered 202 and recorded, every
event applied exactly once (one event row, one ledger entry per redemption and rollback,
ledger totals to the unit, at most one ``event.processed`` line in all the logs, every
other delivery of it a duplicate), nothing left in the queue, the parked list, kombu's
unacked hash or the accepted set, no event unfinished; per job, no two runs' intervals
in ``job_runs`` overlap, skipped runs are recorded, no run failed; and every process
exits 0 on SIGTERM. Whatever happens, the finalizers SIGKILL every process group started.

``MANY_INSTANCES_DELIVERIES`` (default 1200) and ``MANY_INSTANCES_RATE`` (deliveries per
second, default 40) size the run.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import signal
import subprocess
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from devtools.sender import Sender
from devtools.stream import Stream, build_stream
from devtools.webhooks import SECRET, wait_until
from tests.conftest import Processes, process_env
from tests.fault.servers import (
    Servers,
    group_pids,
    job_in_hand,
    kill_groups,
    normal_job_runs,
    slow_job_runs,
    started_servers,
)
from tests.fault.test_under_fire import (
    ledger_totals,
    query,
    reached,
    read_logs,
    settled_probe,
)
from workers.jobs.runner import JOBS

pytestmark = pytest.mark.fault

DELIVERIES = int(os.environ.get("MANY_INSTANCES_DELIVERIES", "1200"))
RATE = float(os.environ.get("MANY_INSTANCES_RATE", "40"))
TWIN_EVERY = 25
WORKERS = ("worker-1@many", "worker-2@many", "worker-3@many")
SCHEDULED_JOBS = ("redrive", "drift", "retention")  # verify is off: no Voucherify API here
SLOW_JOBS = ("drift", "retention")
SLOW_RUN_SECONDS = 0.7
SENT_BY_SECOND_BEAT = 4
"""Tasks of each job the second beat sends before it is stopped."""
SENDING = re.compile(r"Sending due task (\w+)")


@pytest.fixture
def servers() -> Iterator[Servers]:
    with started_servers("vfy-many-") as servers:
        yield servers


def with_twins(stream: Stream, every: int) -> Stream:
    """The stream with a byte-identical twin right after every ``every``-th first copy: the
    round robin sends the two to different webs, a few milliseconds apart."""
    deliveries = []
    for delivery in stream.deliveries:
        deliveries.append(dataclasses.replace(delivery, index=len(deliveries)))
        if not delivery.duplicate and delivery.index % every == 0:
            twin = dataclasses.replace(delivery, index=len(deliveries), duplicate=True)
            deliveries.append(twin)
    return dataclasses.replace(stream, deliveries=deliveries)


class Formation:
    """The processes under test, what was done to them, and how each exited."""

    def __init__(self, servers: Servers, processes: Processes, tmp_path: Path) -> None:
        self.servers = servers
        self.processes = processes
        self.tmp_path = tmp_path
        self.url, self.redis_url = servers.postgres.url(), servers.redis.url()
        every_second = "1"
        self.env = process_env(
            DATABASE_URL=self.url,
            REDIS_URL=self.redis_url,
            VOUCHERIFY_WEBHOOK_SECRET=SECRET,
            WEB_CONCURRENCY="1",  # two instances of one gunicorn worker each
            # Short horizons, so redelivery and the accepted set's sweep happen in the run.
            BROKER_VISIBILITY_TIMEOUT_SECONDS="10",
            RETRY_BACKOFF_MAX_SECONDS="4",
            EVENT_MAX_RETRIES="30",
            REDRIVE_AFTER_SECONDS="20",
            REDRIVE_INTERVAL_SECONDS=every_second,
            DRIFT_INTERVAL_SECONDS=every_second,
            RETENTION_INTERVAL_SECONDS=every_second,
            WORKER_METRICS_PORT="0",  # several workers on one host
        )
        self.webs: list[tuple[subprocess.Popen[bytes], int]] = [
            processes.web(self.env),
            processes.web(self.env),
        ]
        self.workers = {name: processes.worker(self.env, hostname=name) for name in WORKERS}
        self.beat = processes.beat(self.env, tmp_path / "beat-1-schedule")
        self.log_names = {processes.log_of(proc): name for name, proc in self.workers.items()}
        for name, proc in self.workers.items():
            self.wait_ready(proc, f'"{name} ready."', name)
        self.wait_ready(self.beat, '"broker.durability_checked"', "beat-1")
        self.exit_codes: dict[str, int | None] = {}
        """Exit status on SIGTERM, per process (None: still running after 30 s)."""
        self.killed_pids: set[int] = set()
        self.second_beat_sent: Counter[str] = Counter()
        self.skipped_while_two: dict[str, int] = {}
        self.faults: list[str] = []

    def wait_ready(self, proc: subprocess.Popen[bytes], line: str, name: str) -> None:
        """Until the process logged ``line`` (what it logs once it consumes or schedules)."""
        log = self.processes.log_of(proc)
        wait_until(
            lambda: line in log.read_text(errors="replace"),
            timeout=60,
            interval=0.2,
            what=lambda: f"{name} to be ready\n" + self.processes.logs(),
        )

    @property
    def ports(self) -> list[int]:
        return [port for _, port in self.webs]

    def _note(self, sender: Sender, what: str, start: float) -> None:
        self.faults.append(f"{start:6.1f} s - {sender.elapsed():6.1f} s  {what}")

    def kill_worker(self, sender: Sender, name: str) -> None:
        """SIGKILL a worker's process group, then start it again under the same hostname."""
        start = sender.elapsed()
        wait_until(
            lambda: not job_in_hand(self.redis_url),
            timeout=30,
            interval=0.01,
            what="a moment when no job is in a worker's hands",
        )
        victim = self.workers[name]
        self.killed_pids |= group_pids(victim.pid)
        os.killpg(victim.pid, signal.SIGKILL)  # main process and pool: no clean-up at all
        victim.wait(timeout=10)
        self.log_names[self.processes.log_of(victim)] = f"{name} (killed)"
        self.workers[name] = self.processes.worker(self.env, hostname=name)
        self.log_names[self.processes.log_of(self.workers[name])] = f"{name} (restarted)"
        self.wait_ready(self.workers[name], f'"{name} ready."', name)
        self._note(sender, f"SIGKILL {name}, started again", start)

    def second_beat(self, sender: Sender) -> None:
        """Two beats until the second has sent every job a few times, the slow jobs' runs
        slowed meanwhile; then the runs skipped since it started, per job."""
        start = sender.elapsed()
        (since,) = query(self.url, "SELECT coalesce(max(id), 0) FROM job_runs")[0]
        slow_job_runs(self.url, SLOW_JOBS, SLOW_RUN_SECONDS)
        try:
            beat = self.processes.beat(self.env, self.tmp_path / "beat-2-schedule")
            log = self.processes.log_of(beat)

            def sent_enough() -> bool:
                self.second_beat_sent = Counter(SENDING.findall(log.read_text(errors="replace")))
                return all(self.second_beat_sent[j] >= SENT_BY_SECOND_BEAT for j in SCHEDULED_JOBS)

            wait_until(
                sent_enough,
                timeout=60,
                interval=0.2,
                what=lambda: (
                    f"the second beat to send each job {SENT_BY_SECOND_BEAT} times: sent "
                    f"{dict(self.second_beat_sent)}\n" + self.processes.logs()
                ),
            )
            self.exit_codes["beat-2"] = self._terminate(beat)
        finally:
            normal_job_runs(self.url)  # once the runs sleeping in it are done
        self.skipped_while_two = dict(
            query(
                self.url,
                "SELECT job, count(*) FROM job_runs"
                " WHERE outcome = 'skipped' AND id > %(since)s GROUP BY job",
                {"since": since},
            )
        )
        self._note(sender, "a second beat, drift and retention runs slowed", start)

    def restart_web(self, sender: Sender, which: int) -> None:
        """SIGTERM one web; the sender keeps routing to it (refused: sent again to the
        other) until a new one listens, then routes to the new one."""
        start = sender.elapsed()
        proc, _ = self.webs[which]
        self.exit_codes[f"web-{which + 1} (rolling deploy)"] = self._terminate(proc)
        self.webs[which] = self.processes.web(self.env)
        sender.set_ports(self.ports)
        self._note(sender, f"SIGTERM web-{which + 1}, started again", start)

    def _terminate(self, proc: subprocess.Popen[bytes]) -> int | None:
        proc.terminate()
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """SIGTERM to every process at once, as the platform does at a shutdown."""
        running = {f"web-{i + 1}": proc for i, (proc, _) in enumerate(self.webs)}
        running.update(self.workers)
        running["beat-1"] = self.beat
        for proc in running.values():
            proc.terminate()
        for name, proc in running.items():
            try:
                self.exit_codes[name] = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.exit_codes[name] = None

    def alive(self) -> dict[str, bool]:
        procs = {f"web-{i + 1}": proc for i, (proc, _) in enumerate(self.webs)}
        procs.update(self.workers)
        procs["beat-1"] = self.beat
        return {name: proc.poll() is None for name, proc in procs.items()}


@pytest.fixture
def formation(servers: Servers, processes: Processes, tmp_path: Path) -> Iterator[Formation]:
    try:
        yield Formation(servers, processes, tmp_path)
    finally:
        processes.stop_all()
        kill_groups(processes.running)  # what a main process left behind, if anything


def overlaps(runs: list[Any]) -> list[str]:
    """Runs of one job whose intervals overlap. A run killed with its worker (no end) held
    the lock until the lock's expiry."""
    found = []
    ordered = sorted(runs, key=lambda r: r["started_at"])
    for before, after in itertools.pairwise(ordered):
        end = before["finished_at"] or before["started_at"] + timedelta(
            seconds=JOBS[before["job"]].lock_ttl_seconds
        )
        if end > after["started_at"]:
            found.append(
                f"{before['job']}: the run of {before['runner']} from {before['started_at']:%T.%f}"
                f" to {end:%T.%f} overlaps the run of {after['runner']} from"
                f" {after['started_at']:%T.%f}"
            )
    return found


@pytest.mark.timeout(600)
def test_two_webs_three_workers_and_a_second_beat_apply_every_delivery_exactly_once(
    formation: Formation, processes: Processes, capsys: pytest.CaptureFixture[str]
) -> None:
    stream = with_twins(build_stream(DELIVERIES, seed=4242, prefix="many"), TWIN_EVERY)
    total = len(stream.deliveries)
    url, redis_url = formation.url, formation.redis_url
    sender = Sender(stream.deliveries, formation.ports[0], threads=24, rate=RATE)
    sender.set_ports(formation.ports)

    sender.start()
    timeout = total / RATE + 60
    wait_until(reached(sender, total * 15 // 100), timeout=timeout, what="15 % sent")
    formation.kill_worker(sender, WORKERS[1])
    wait_until(reached(sender, total * 30 // 100), timeout=timeout, what="30 % sent")
    formation.second_beat(sender)
    wait_until(reached(sender, total * 65 // 100), timeout=timeout, what="65 % sent")
    formation.restart_web(sender, 1)
    assert sender.join(timeout=timeout + 60), "the sender did not finish"
    stream_ended = sender.elapsed()

    accepted = sender.accepted()
    accepted_ids = [a.delivery_id for a in accepted.values() if a.delivery_id]
    state: dict[str, int] = {}
    settled = settled_probe(url, redis_url, accepted_ids, state)

    # Long enough for a lock left by a killed run to expire (JobSpec.lock_ttl_seconds),
    # should the kill have hit one after all, and the sweep to run after it.
    wait_until(
        settled,
        timeout=300,
        interval=0.5,
        what=lambda: f"the pipeline to settle: {state}\nlogs: {processes.log_dir}",
    )
    settled_at = sender.elapsed()
    alive = formation.alive()

    # --- what the database and the logs say -------------------------------------------
    events = dict(query(url, "SELECT event_id, status FROM events"))
    recorded = {
        r[0]
        for r in query(
            url,
            "SELECT delivery_id FROM deliveries WHERE delivery_id = ANY(%(ids)s)",
            {"ids": accepted_ids},
        )
    }
    per_event: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for event_id, outcome, n in query(
        url, "SELECT event_id, outcome, count(*) FROM deliveries GROUP BY 1, 2"
    ):
        per_event[event_id][outcome] = n
    ledger = query(url, "SELECT redemption_id, effect, count(*) FROM ledger_entries GROUP BY 1, 2")
    totals = ledger_totals(url)
    flags = dict(query(url, "SELECT event_id, count(*) FROM flags GROUP BY 1"))
    dead_letters = query(url, "SELECT event_id, reason FROM dead_letters")
    logged, _ = read_logs(processes.log_dir)
    applied_by = {
        name: sum(
            1
            for line in path.read_text(errors="replace").splitlines()
            if '"event.processed"' in line
        )
        for path, name in formation.log_names.items()
    }
    formation.stop()
    # The jobs' record once no run can be in progress: a warm shutdown finishes them.
    runs = [
        {
            "job": job,
            "outcome": outcome,
            "started_at": started,
            "finished_at": finished,
            "runner": runner,
        }
        for job, outcome, started, finished, runner in query(
            url, "SELECT job, outcome, started_at, finished_at, runner FROM job_runs ORDER BY id"
        )
    ]

    # --- the report -------------------------------------------------------------------
    webs_of: defaultdict[str, set[int | None]] = defaultdict(set)
    for attempt in sender.attempts:
        if attempt.status == 202:
            webs_of[stream.deliveries[attempt.index].event_id].add(attempt.port)
    on_two_webs = sum(1 for ports in webs_of.values() if len(ports) > 1)
    outcomes = Counter((r["job"], r["outcome"]) for r in runs)
    mix = stream.mix()
    report = [
        "",
        f"many instances: {mix['deliveries']} deliveries at {RATE:g}/s over 2 webs "
        f"({mix['events']} events; {mix['duplicates']} duplicates and twins, "
        f"{mix['out_of_order']} out of order)",
        f"  requests {len(sender.attempts)}: {sender.status_histogram()}",
        f"  events accepted by both webs: {on_two_webs}",
        f"  stream ended at {stream_ended:.1f} s, settled at {settled_at:.1f} s",
        f"  events applied per worker: {applied_by}",
        f"  job runs: {dict(sorted(outcomes.items()))}",
        f"  second beat sent {dict(formation.second_beat_sent)}; skipped meanwhile "
        f"{formation.skipped_while_two}",
        "  faults:",
        *(f"    {line}" for line in formation.faults),
        f"  exit codes on SIGTERM: {formation.exit_codes}",
    ]
    with capsys.disabled():
        print("\n".join(report))

    # --- every delivery applied exactly once ------------------------------------------
    assert not sender.outcome.abandoned, "deliveries never answered 202"
    assert len(accepted) == total, f"{total - len(accepted)} deliveries not answered 202"
    assert set(recorded) == set(accepted_ids), f"{len(accepted_ids) - len(recorded)} lost"
    assert set(events) == stream.event_ids
    assert set(events.values()) == {"processed"}, Counter(events.values())
    assert not dead_letters, dead_letters[:5]
    # Not every event is logged: a worker SIGKILLed between its commit and its log line
    # applied one silently. None is logged twice.
    assert set(logged) <= stream.event_ids
    twice = {e: n for e, n in logged.items() if n > 1}
    assert not twice, twice
    # One delivery of each event applied it; every other one was recorded as a duplicate.
    assert {e for e, c in per_event.items() if c["processed"] == 1} == stream.event_ids
    assert {o for c in per_event.values() for o in c} <= {"processed", "duplicate"}
    debits = {stream.effects[e].redemption_id for e in stream.redemptions}
    restores = {stream.effects[e].redemption_id for e in stream.rollbacks}
    assert {(r, e) for r, e, _ in ledger} == {(r, "debit") for r in debits} | {
        (r, "restore") for r in restores
    }
    assert {n for _, _, n in ledger} == {1}
    assert totals == stream.expected_totals(stream.event_ids)
    assert flags == dict.fromkeys(stream.rollback_failures, 1)
    # The load balancer's part: both webs took deliveries, and some events from both.
    assert on_two_webs > 0, "no event was accepted by both webs"
    assert {a.port for a in accepted.values()} >= set(formation.ports)

    # --- one run of a job at a time, with two beats -----------------------------------
    assert formation.second_beat_sent, "the second beat sent nothing"
    for job in SCHEDULED_JOBS:
        done = [r for r in runs if r["job"] == job and r["outcome"] != "skipped"]
        assert any(r["outcome"] == "succeeded" for r in done), f"{job} never ran"
        assert not overlaps(done), overlaps(done)
    # Slowed, the runs of the two beats could not all fit: some found the lock taken.
    assert all(formation.skipped_while_two.get(job) for job in SLOW_JOBS), outcomes
    assert not [r for r in runs if r["outcome"] == "failed"]
    # A run still 'running' can only be one killed with its worker.
    unfinished = [r for r in runs if r["outcome"] == "running"]
    killed = formation.killed_pids
    stray = [r for r in unfinished if int(r["runner"].rsplit(":", 1)[1]) not in killed]
    assert not stray, stray

    # --- every process up to the end, and out cleanly on SIGTERM ----------------------
    assert all(alive.values()), alive
    assert all(p > 0 for p in applied_by.values()), applied_by
    assert formation.exit_codes == dict.fromkeys(formation.exit_codes, 0), formation.exit_codes
