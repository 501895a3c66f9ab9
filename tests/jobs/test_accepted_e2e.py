"""A delivery the transport lost after the receiver's 202 comes back through real processes.

The receiver's publisher accepts a delivery; its message is then taken off the queue and
dropped (what a worker SIGKILLed between kombu's BRPOP and its bookkeeping leaves). A real
``beat`` runs the re-drive job, whose sweep pushes the accepted copy again, and a real
worker applies it and forgets the copy.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from devtools.webhooks import body_of, card_redemption, envelope, wait_until
from tests.conftest import Processes, process_env
from tests.jobs.conftest import rows
from workers.queue import ACCEPTED_HASH, DELIVERY_QUEUE, DeliveryPublisher

pytestmark = pytest.mark.e2e


def test_an_accepted_delivery_lost_by_the_transport_is_applied_by_the_sweep(
    processes: Processes,
    database_url: str,
    redis_url: str,
    redis_client: redis.Redis,
    db: psycopg.Connection[Any],
    tmp_path: Path,
) -> None:
    data = card_redemption("loyalty", "r_swept", amount=300, balance_after=700)
    body = body_of(envelope("redemption.succeeded", data, event_id="ev_swept")).decode()
    publisher = DeliveryPublisher(redis_url, 1.0)
    try:
        publisher.publish(body, "d_swept", datetime.now(UTC).isoformat())
    finally:
        publisher.close()
    assert redis_client.rpop(DELIVERY_QUEUE) is not None  # taken, then lost with its worker
    assert redis_client.hexists(ACCEPTED_HASH, "d_swept")

    env = process_env(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        REDRIVE_INTERVAL_SECONDS="1",
        REDRIVE_AFTER_SECONDS="2",
    )
    processes.worker(env)
    processes.beat(env, tmp_path / "beat")

    def applied() -> bool:
        return rows(db, "SELECT delivery_id, outcome FROM deliveries") == [("d_swept", "processed")]

    wait_until(applied, timeout=60, what=lambda: "the lost delivery applied\n" + processes.logs())
    wait_until(
        lambda: not redis_client.hexists(ACCEPTED_HASH, "d_swept"),
        timeout=10,
        what="its accepted copy forgotten",
    )
    assert rows(db, "SELECT redemption_id, effect, kind, amount FROM ledger_entries") == [
        ("r_swept", "debit", "loyalty_points", -300)
    ]
