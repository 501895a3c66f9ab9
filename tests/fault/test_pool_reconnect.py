"""A worker's connection pool is usable again soon after PostgreSQL comes back.

psycopg_pool re-connects with a doubling delay (1, 2, 4, 8, 16 ... s) until its
``reconnect_timeout``. With the default (300 s) a pool that lost PostgreSQL for 20 s made
its next attempt about 31 s after the first failure: the workers sat idle for 8-11 s with
PostgreSQL up again (found by tests/fault/test_under_fire.py). ``workers/db.py`` bounds the
series at 10 s, so attempts are at most about 4 s apart.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg_pool import PoolTimeout

from devtools.servers import EmbeddedPostgres
from devtools.webhooks import wait_until
from workers.db import close_pool, get_pool

pytestmark = pytest.mark.fault

OUTAGE_SECONDS = 20.0


@pytest.fixture
def postgres() -> Iterator[EmbeddedPostgres]:
    # Outside pytest's tmp_path: see tests/fault/servers.py (started_servers).
    root = Path(tempfile.mkdtemp(prefix="vfy-pool-reconnect-"))
    server = EmbeddedPostgres(root / "pg", durable=False)
    server.start()
    yield server
    server.stop(mode="immediate")
    shutil.rmtree(root, ignore_errors=True)


def test_the_pool_hands_out_a_connection_within_5s_of_postgresql_coming_back(
    postgres: EmbeddedPostgres,
) -> None:
    pool = get_pool(postgres.url())
    served_at: list[float] = []
    stop = threading.Event()

    def like_a_worker() -> None:
        # A task taking a connection, failing, and trying again, as the workers do.
        while not stop.is_set():
            try:
                with pool.connection() as conn:
                    conn.execute("SELECT 1")
                served_at.append(time.monotonic())
            except (psycopg.OperationalError, PoolTimeout):
                pass
            stop.wait(0.2)

    try:
        wait_until(lambda: pool.get_stats().get("pool_available", 0) > 0, what="a connection")
        postgres.stop(mode="fast")
        client = threading.Thread(target=like_a_worker, daemon=True)
        client.start()
        time.sleep(OUTAGE_SECONDS)  # the outage itself
        served_at.clear()
        postgres.start()
        back_at = time.monotonic()
        wait_until(lambda: served_at, timeout=60, what="a connection after the restart")
        assert served_at[0] - back_at < 5.0
    finally:
        stop.set()
        close_pool()
