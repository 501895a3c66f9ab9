"""``/metrics`` of the web process: the ``pipeline_*`` gauges read once per window whatever
the scrapes, and the optional ``METRICS_TOKEN``. Real PostgreSQL and Redis."""

from __future__ import annotations

import dataclasses
import threading
from contextlib import AbstractContextManager
from typing import Any

import psycopg
import pytest
import redis
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

import ops
from config.settings import MIN_TOKEN_CHARS, Settings
from devtools.servers import free_port
from ops.context import OpsContext
from ops.gauges import CACHE_SECONDS, PipelineCollector
from web import metrics
from web.app import create_app
from workers.queue import DELIVERY_QUEUE

METRICS_TOKEN = "metrics-test-token-" + "m" * MIN_TOKEN_CHARS
SCRAPERS = 6
SCRAPES = 5  # per scraper


class Reads:
    """Counts what a collector's context reads: transactions (the gauge SQL) and Redis."""

    def __init__(self, context: OpsContext, monkeypatch: pytest.MonkeyPatch) -> None:
        self.transactions = 0
        self.redis = 0
        transaction, depths = context.transaction, context.queue_depths

        def counted_transaction(
            *args: Any, **kwargs: Any
        ) -> AbstractContextManager[psycopg.Connection[Any]]:
            self.transactions += 1
            return transaction(*args, **kwargs)

        def counted_depths() -> dict[str, int]:
            self.redis += 1
            return depths()

        monkeypatch.setattr(context, "transaction", counted_transaction)
        monkeypatch.setattr(context, "queue_depths", counted_depths)


def collector_of(app: Flask) -> PipelineCollector:
    (collector,) = [c for c in ops.collectors(app) if isinstance(c, PipelineCollector)]
    return collector


def samples(text: str) -> dict[str, float]:
    """The ``pipeline_*`` samples, keyed ``name{label=value,...}`` (values unquoted)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("pipeline_"):
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


def test_scrapes_from_many_threads_within_the_window_read_the_database_and_redis_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(settings)
    reads = Reads(collector_of(app).context, monkeypatch)
    answers: list[dict[str, float]] = []
    lock = threading.Lock()
    start = threading.Barrier(SCRAPERS)

    def scrape() -> None:
        client = app.test_client()
        start.wait()
        for _ in range(SCRAPES):
            response = client.get("/metrics")
            assert response.status_code == 200
            with lock:
                answers.append(samples(response.get_data(as_text=True)))

    threads = [threading.Thread(target=scrape) for _ in range(SCRAPERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(answers) == SCRAPERS * SCRAPES
    assert (reads.transactions, reads.redis) == (1, 1)  # 30 scrapes, far less than 10 s
    assert all(answer == answers[0] for answer in answers)
    assert answers[0]["pipeline_state_up{source=postgres}"] == 1


@pytest.fixture
def clock() -> list[float]:
    """A monotonic clock the test moves by hand: no test waits out a 10 s window."""
    return [1000.0]


def test_gauges_keep_their_values_until_the_window_passes(
    settings: Settings,
    db: psycopg.Connection[Any],
    redis_client: redis.Redis,
    clock: list[float],
) -> None:
    context = OpsContext(settings)
    collector = PipelineCollector(context, clock=lambda: clock[0])
    assert collector.cache_seconds >= 10  # the production default

    def scrape() -> dict[str, float]:
        return samples(metrics.render([collector])[0].decode())

    first = scrape()
    assert first["pipeline_waiting_events"] == 0
    assert first["pipeline_queue_depth{queue=deliveries}"] == 0
    db.execute(
        "INSERT INTO events (event_id, type, received_at) "
        "VALUES ('ev_gauge_1', 'redemption.succeeded', now())"
    )
    redis_client.lpush(DELIVERY_QUEUE, b"{}")

    clock[0] += CACHE_SECONDS - 0.5
    assert scrape() == first  # within the window: the last reading, Redis's too
    clock[0] += 0.5
    fresh = scrape()
    assert fresh["pipeline_waiting_events"] == 1
    assert fresh["pipeline_queue_depth{queue=deliveries}"] == 1
    context.close()


def test_an_unreadable_database_is_cached_too_and_reported_until_the_next_reading(
    settings: Settings, clock: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = dataclasses.replace(
        settings, database_url=f"postgresql://nobody@127.0.0.1:{free_port()}/none"
    )
    context = OpsContext(gone)
    reads = Reads(context, monkeypatch)
    collector = PipelineCollector(context, clock=lambda: clock[0])
    for _ in range(5):
        text = metrics.render([collector])[0].decode()
        assert samples(text)["pipeline_state_up{source=postgres}"] == 0
        assert samples(text)["pipeline_state_up{source=redis}"] == 1
    assert reads.transactions == 1
    context.close()


# --- METRICS_TOKEN ------------------------------------------------------------------------


@pytest.fixture
def guarded(settings: Settings) -> Flask:
    return create_app(dataclasses.replace(settings, metrics_token=METRICS_TOKEN))


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Bearer wrong-token-" + "w" * MIN_TOKEN_CHARS,
        f"Bearer {METRICS_TOKEN[:-1]}",
        f"Basic {METRICS_TOKEN}",
        METRICS_TOKEN,
    ],
    ids=["none", "wrong", "prefix", "basic", "no-scheme"],
)
def test_metrics_with_a_token_refuse_a_scrape_without_it_and_read_nothing(
    guarded: Flask, authorization: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = Reads(collector_of(guarded).context, monkeypatch)
    headers = {"Authorization": authorization} if authorization else {}
    response = guarded.test_client().get("/metrics", headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert b"pipeline_" not in response.data
    assert b"receiver_requests_total" not in response.data
    assert (reads.transactions, reads.redis) == (0, 0)


def test_metrics_with_a_token_answer_the_scrape_that_carries_it(guarded: Flask) -> None:
    response = guarded.test_client().get(
        "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
    )
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert samples(response.get_data(as_text=True))["pipeline_state_up{source=postgres}"] == 1


def test_metrics_without_a_token_answer_anyone(settings: Settings) -> None:
    assert settings.metrics_token is None
    response = create_app(settings).test_client().get("/metrics")
    assert response.status_code == 200
