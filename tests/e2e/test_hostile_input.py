"""Hostile signed bodies through the real processes: each ends as one dead letter with a
short reason, at its first attempt, and nothing is left in the accepted set to loop.

Every one goes through the real receiver, signed: a correctly signed body is always
answered 202 (a 4xx would make Voucherify disable the endpoint), and the worker ends what
it cannot process as a dead letter with its reason.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import redis

from devtools.webhooks import body_of, card_redemption, envelope, sign, wait_until
from tests.conftest import Processes
from tests.e2e.test_pipeline import post
from workers.queue import (
    ACCEPTED_HASH,
    ACCEPTED_INDEX,
    ACCEPTED_PUSHES,
    DELIVERY_QUEUE,
)

pytestmark = pytest.mark.e2e


def redemption(event_id: str) -> bytes:
    data = card_redemption("gift", f"r_{event_id}", amount=100, balance_after=900)
    return body_of(envelope("redemption.succeeded", data, event_id=event_id))


def test_hostile_signed_bodies_end_as_one_dead_letter_each_and_leave_nothing_to_sweep(
    pipeline_port: int,
    processes: Processes,
    db: psycopg.Connection[Any],
    redis_client: redis.Redis,
) -> None:
    surrogate = redemption("ev_\ud800_e2e")  # valid JSON: the escape, not the character
    deep = redemption("ev_deep_e2e").replace(
        b'"metadata":', b'"metadata":' + b"[" * 500 + b"]" * 500 + b',"x":', 1
    )
    nan = redemption("ev_nan_e2e").replace(b'"project_id":', b'"x":NaN,"project_id":', 1)
    not_utf8 = redemption("ev_utf8_e2e").replace(b'"project_id":', b'"x":"\xff","project_id":', 1)
    not_an_object = b'[{"id":"whs_array"}]'
    # Past the old 256 KiB default, under the 1 MiB one: a large order is applied.
    large = redemption("ev_large_e2e").replace(
        b'"metadata":{', b'"metadata":{"pad":"' + b"x" * 300_000 + b'",', 1
    )
    assert 256 * 1024 < len(large) < 1024 * 1024
    for body in (surrogate, deep, nan, not_utf8, not_an_object, large):
        status, payload = post(pipeline_port, body, sign(body))
        assert status == 202, payload

    def five_dead_letters_and_the_large_one_applied() -> bool:
        row = db.execute(
            "SELECT count(*), (SELECT count(*) FROM events WHERE status = 'processed')"
            " FROM dead_letters"
        ).fetchone()
        return row == (5, 1)

    wait_until(
        five_dead_letters_and_the_large_one_applied,
        timeout=60,
        what=lambda: "five dead letters\n" + processes.logs(),
    )
    wait_until(
        lambda: redis_client.hlen(ACCEPTED_HASH) == 0, timeout=10, what="accepted copies forgotten"
    )

    letters = db.execute(
        "SELECT d.event_id, d.reason, e.status, e.attempts, e.raw_body IS NOT NULL"
        " FROM dead_letters d JOIN events e USING (event_id) ORDER BY d.id"
    ).fetchall()
    by_reason = {
        reason: (event_id, status, attempts, kept)
        for event_id, reason, status, attempts, kept in letters
    }
    assert set(by_reason) == {
        "not storable: the event id holds a lone surrogate",
        "not storable: JSON nested over 64 levels deep",
        "rejected by the database: SQLSTATE 22P02 (class 22, data exception)",
        "not storable: body is not UTF-8",
        "body is not a JSON object",
    }
    surrogate_id = by_reason["not storable: the event id holds a lone surrogate"][0]
    assert surrogate_id.startswith("ev_\ufffd_e2e~")
    # Dead at the first attempt, each body kept as text (jsonb takes none of them), but
    # the one not UTF-8: no PostgreSQL text can hold it.
    assert by_reason["not storable: body is not UTF-8"][1:] == ("dead", 1, False)
    del by_reason["not storable: body is not UTF-8"]
    assert {tuple(v[1:]) for v in by_reason.values()} == {("dead", 1, True)}
    assert sorted(db.execute("SELECT outcome, count(*) FROM deliveries GROUP BY 1").fetchall()) == [
        ("dead", 5),
        ("processed", 1),
    ]
    # Nothing left for the sweep to push again, nothing queued.
    assert redis_client.zcard(ACCEPTED_INDEX) == 0
    assert redis_client.hlen(ACCEPTED_PUSHES) == 0
    assert redis_client.llen(DELIVERY_QUEUE) == 0
    # The log lines carry the short reasons, never the server's text.
    logs = processes.logs()
    assert "not storable: the event id holds a lone surrogate" in logs
    assert "invalid input syntax" not in logs
    assert "Token" not in logs
