"""Fuzz: random and mutated bodies, signed, into the real receiver and a real worker.

Bounded (a fixed number of examples, a deadline for the worker to settle), in CI. The
bodies: the published payloads of every type in ``tests/fixtures/voucherify`` mutated
(free text replaced by hostile strings, keys dropped, values nulled or retyped, subtrees
nested deep, NaN and Infinity written in, bytes flipped), envelopes generated from the
published webhook schemas (``devtools.payloads``), and arbitrary JSON and bytes. Each is
signed, a few with a forged or malformed signature header. What must hold:

- never a 5xx (nothing here takes the broker away, so not even a 503);
- every delivery answered 202 reaches a final outcome in PostgreSQL (processed,
  duplicate, ignored or dead) within the deadline, at its first attempt;
- no process dies, and nothing is left in Redis: the queue and the accepted set empty.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools.payloads import webhook_envelope
from devtools.webhooks import REDEMPTION_FAMILY, VOUCHERIFY, envelope, sign, wait_until
from tests.conftest import PipelineEnv, Processes, http_call
from workers.queue import ACCEPTED_HASH, DELIVERY_QUEUE

pytestmark = pytest.mark.e2e

EXAMPLES = 400
SETTLE_SECONDS = 90
FINAL_OUTCOMES = ("processed", "duplicate", "ignored", "dead")
ANSWERS = (202, 401, 413)

HOSTILE_STRINGS = (
    "\x00",
    "nul \x00 inside",
    "\ud800",
    "lone \udfff low",
    "\u202e right-to-left",
    "emoji \U0001f4a9",
    "x" * 3000,
    "'; DROP TABLE events; --",
    "${jndi:ldap://x}",
    "\\",
    '"',
    "",
    " ",
)
HOSTILE_VALUES: tuple[Any, ...] = (
    None,
    0,
    -1,
    2**63,
    -(2**70),
    1.5e308,
    True,
    [],
    {},
    "2024-02-30T25:61:00+25:00",
    "0000-01-01T00:00:00Z",
    "10000-01-01T00:00:00Z",
)


def _documents() -> list[tuple[str, Any]]:
    """(type, data) of every published example, in an envelope's terms."""
    found = []
    for path in sorted(VOUCHERIFY.glob("*.example.json")):
        name = path.name.removesuffix(".example.json")
        if name.startswith(("api.", "envelope.", "legacy-")):
            continue
        found.append((name, json.loads(path.read_text())))
    return found


DOCUMENTS = _documents()
SERIAL = itertools.count()


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            paths += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            paths += _paths(value, (*prefix, index))
    return paths


def _set(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return document


def _drop(document: Any, path: tuple[Any, ...]) -> Any:
    if not path:
        return document
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    del parent[path[-1]]
    return document


@st.composite
def mutated_payload(draw: st.DrawFn) -> bytes:
    """A published payload in its envelope, with a few hostile mutations, as bytes."""
    event_type, data = draw(st.sampled_from(DOCUMENTS))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = random.Random(seed)
    prefix = draw(st.sampled_from(["ev_fuzz_"] * 5 + ["ev_\ud800_", "ev_\x00_", "e" * 400]))
    event_id = f"{prefix}{next(SERIAL)}"  # unique: duplicates are not what this tests
    document = envelope(event_type, json.loads(json.dumps(data)), event_id=event_id)
    for _ in range(draw(st.integers(0, 3))):
        path = rng.choice(_paths(document))
        action = rng.randrange(5)
        if action == 0:
            document = _set(document, path, rng.choice(HOSTILE_STRINGS))
        elif action == 1:
            document = _set(document, path, rng.choice(HOSTILE_VALUES))
        elif action == 2 and path:
            document = _drop(document, path)
        elif action == 3:
            nested: Any = "deep"
            for _ in range(rng.choice((10, 63, 65, 300))):
                nested = [nested]
            document = _set(document, path, nested)
        else:
            document = _set(document, path, float("nan"))  # written as NaN below
    text = json.dumps(document, allow_nan=True, ensure_ascii=rng.random() < 0.5)
    body = text.encode("utf-8", "surrogatepass")
    if rng.random() < 0.1 and body:  # a flipped byte: maybe not JSON, maybe not UTF-8
        index = rng.randrange(len(body))
        body = body[:index] + bytes([rng.randrange(256)]) + body[index + 1 :]
    return body


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)


@st.composite
def from_the_schemas(draw: st.DrawFn) -> bytes:
    """An envelope generated from Voucherify's published webhook schemas (any Unicode,
    lone surrogates included, in any free-text field)."""
    event_type = draw(st.sampled_from(REDEMPTION_FAMILY))
    document = draw(webhook_envelope(event_type, surrogates=True))
    return json.dumps(document).encode()


@st.composite
def arbitrary_json(draw: st.DrawFn) -> bytes:
    value = draw(JSON_VALUES)
    if draw(st.booleans()):
        value = {"id": "whs_fuzz", "type": draw(st.text(max_size=40)), "data": value}
    text = json.dumps(value, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")


# Mostly mutated payloads (one_of picks a branch uniformly): they reach the worker.
BODIES = st.one_of(
    mutated_payload(),
    mutated_payload(),
    from_the_schemas(),
    arbitrary_json(),
    st.binary(max_size=300),
)
SIGNATURES = st.sampled_from(["good"] * 8 + ["forged", "malformed"])


def post(port: int, body: bytes, signature: str) -> tuple[int, dict[str, Any]]:
    header = {
        "good": sign(body),
        "forged": sign(body, "not-the-secret"),
        "malformed": "sha256=" + sign(body)[:20],
    }[signature]
    headers = {"Content-Type": "application/json", "x-voucherify-signature": header}
    response, raw = http_call(port, "POST", "/webhooks/voucherify", body, headers, timeout=30)
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = {"raw": raw[:200].decode("latin-1")}
    return response.status, answer


def test_random_and_mutated_signed_bodies_are_all_2xx_and_all_end_final(
    processes: Processes,
    pipeline_env: PipelineEnv,
    db: psycopg.Connection[Any],
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    (tmp_path / "metrics").mkdir()
    env = pipeline_env(PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"), WORKER_METRICS_PORT="0")
    web, port = processes.web(env)
    worker = processes.worker(env)
    accepted: list[str] = []
    answers: dict[int, int] = {}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(body=BODIES, signature=SIGNATURES)
    def send(body: bytes, signature: str) -> None:
        status, answer = post(port, body, signature)
        answers[status] = answers.get(status, 0) + 1
        assert status in ANSWERS, (status, answer, body[:300])
        if signature != "good":
            assert status == 401, (status, answer)
        else:  # every correctly signed body gets a 2xx: a 4xx disables the endpoint
            assert status == 202, (status, answer, body[:300])
        if status == 202:
            accepted.append(answer["delivery_id"])

    send()
    assert accepted, answers  # the mutations leave plenty of real webhooks

    def settled() -> bool:
        rows = db.execute(
            "SELECT count(*) FROM deliveries"
            " WHERE delivery_id = ANY(%(ids)s) AND outcome = ANY(%(final)s)",
            {"ids": accepted, "final": list(FINAL_OUTCOMES)},
        ).fetchone()
        return rows is not None and rows[0] == len(set(accepted))

    wait_until(
        settled,
        timeout=SETTLE_SECONDS,
        what=lambda: f"{len(accepted)} accepted deliveries final\n{processes.logs()}",
    )
    wait_until(
        lambda: redis_client.hlen(ACCEPTED_HASH) == 0 and redis_client.llen(DELIVERY_QUEUE) == 0,
        timeout=15,
        what="the queue and the accepted set empty",
    )
    retried = db.execute(
        "SELECT count(*) FROM events WHERE attempts > 1 OR status IN ('received', 'failed')"
    ).fetchone()
    assert retried is not None
    assert retried[0] == 0, "every delivery final at its first attempt"
    assert web.poll() is None, processes.logs()
    assert worker.poll() is None, processes.logs()
    outcomes = dict(
        db.execute(
            "SELECT outcome, count(*) FROM deliveries WHERE delivery_id = ANY(%(ids)s)"
            " GROUP BY outcome",
            {"ids": accepted},
        ).fetchall()
    )
    print(f"fuzz: answers {sorted(answers.items())}, outcomes {sorted(outcomes.items())}")
