"""A worker whose prefetch window is full when Redis restarts goes on consuming.

Found while building the fault suite: Redis restarted while a worker had its whole
prefetch window in hand (any backlog), the late acks of those tasks failed on the dead
connection, and kombu kept counting them as in hand, so the worker never asked Redis for
a message again. It stayed up, silent, with the backlog untouched in Redis. Fixed by
compat/kombu_redis.py; without it this test ends with 8 of 300 deliveries recorded.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
import redis

from devtools.servers import EmbeddedPostgres, EmbeddedRedis
from devtools.webhooks import body_of, card_redemption, envelope, wait_until
from migrations import apply_migrations
from tests.conftest import Processes, process_env
from tests.fault.servers import unacked
from workers.queue import DELIVERY_QUEUE, Message

pytestmark = pytest.mark.fault

BACKLOG = 300


@pytest.fixture
def servers() -> Iterator[tuple[EmbeddedPostgres, EmbeddedRedis]]:
    # Outside pytest's tmp_path: see tests/fault/servers.py (started_servers).
    root = Path(tempfile.mkdtemp(prefix="vfy-broker-restart-"))
    postgres = EmbeddedPostgres(root / "pg", durable=False)
    broker = EmbeddedRedis(root / "redis", appendfsync="everysec")
    postgres.start()
    broker.start()
    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        apply_migrations(conn)
    yield postgres, broker
    broker.stop()
    postgres.stop(mode="immediate")
    shutil.rmtree(root, ignore_errors=True)


def recorded(url: str) -> int:
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            row = conn.execute("SELECT count(*) FROM deliveries").fetchone()
    except psycopg.OperationalError:
        return -1
    return int(row[0]) if row else 0


def test_a_worker_whose_acks_fail_during_a_redis_restart_goes_on_consuming(
    servers: tuple[EmbeddedPostgres, EmbeddedRedis], processes: Processes
) -> None:
    postgres, broker = servers
    client = redis.Redis.from_url(broker.url())
    pipe = client.pipeline(transaction=False)
    for i in range(BACKLOG):
        data = card_redemption("gift", f"r_restart_{i}", amount=100 + i, balance_after=5000)
        body = body_of(envelope("redemption.succeeded", data, event_id=f"ev_restart_{i}"))
        now = datetime.now(UTC).isoformat()
        pipe.lpush(DELIVERY_QUEUE, Message(body.decode(), uuid.uuid4().hex, now).encode())
    pipe.execute()
    client.close()

    url = postgres.url()
    env = process_env(
        DATABASE_URL=url,
        REDIS_URL=broker.url(),
        BROKER_VISIBILITY_TIMEOUT_SECONDS="10",
        RETRY_BACKOFF_MAX_SECONDS="4",
        WORKER_METRICS_PORT="0",
        # Batches of 2 keep the window of this test at 8 (the multiplier is twice the
        # batch size, at least 4): the acks that fail are then a batch's acknowledgement.
        WORKER_BATCH_SIZE="2",
    )
    # The tasks block on a lock, so the worker fills its prefetch window (4 per process,
    # 2 processes) and holds it: the moment a Redis restart under load makes likely.
    with psycopg.connect(url) as blocker:
        blocker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        processes.worker(env)
        wait_until(lambda: unacked(broker.url()) == 8, timeout=60, what="a full window")
        broker.stop()  # graceful SHUTDOWN
    # The lock is gone: the 8 tasks finish and their acks fail, Redis being down.
    time.sleep(2)  # the outage itself
    broker.start()

    try:
        wait_until(lambda: recorded(url) >= BACKLOG, timeout=60, interval=0.5, what="the drain")
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}: {recorded(url)} of {BACKLOG} recorded\n{processes.logs()}"
        ) from None
    with psycopg.connect(url) as conn:
        processed = conn.execute("SELECT count(*) FROM events WHERE status = 'processed'")
        assert processed.fetchone() == (BACKLOG,)
