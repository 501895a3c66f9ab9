"""The rendering of the web process's Prometheus metrics for ``/metrics``.

The counters themselves belong to who counts: the webhook's and the ops routes' answers
and the ack latency to ``receiver.metrics``, the ``pipeline_*`` gauges to ``ops.gauges``.

Under gunicorn, ``PROMETHEUS_MULTIPROC_DIR`` is set (see ``web/gunicorn.py``) and every
worker process writes to its own files in it; ``/metrics`` aggregates them. Without it
(tests, the Flask dev server) the default per-process registry is used.

With ``METRICS_TOKEN`` set, ``/metrics`` answers only ``Authorization: Bearer <token>``
(compared in constant time, ``ops.auth``) and 401 to anyone else, before reading anything;
without it, anyone may scrape. The ``pipeline_*`` gauges are cached per process either way
(``ops.gauges``), so scrapes cost the database nothing more than one read per window.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from flask import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.registry import Collector

from ops.auth import bearer_matches


def authorized(authorization: str | None, token: str | None) -> bool:
    """Whether a scrape with this ``Authorization`` header may read the metrics."""
    return token is None or bearer_matches(authorization, token)


def unauthorized() -> Response:
    """Not logged: a flood of scrapes without the token must not flood the logs either."""
    response = Response("unauthorized\n", status=401, mimetype="text/plain")
    response.headers["WWW-Authenticate"] = 'Bearer realm="metrics"'
    return response


def render(extra: Iterable[Collector] = ()) -> tuple[bytes, str]:
    """The process's (or all gunicorn workers') metrics, then those of ``extra`` collectors
    (the ``pipeline_*`` gauges of ``ops.gauges``, read when scraped, at most once a window)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        payload = generate_latest(registry)
    else:
        payload = generate_latest()
    collectors = list(extra)
    if collectors:
        scraped = CollectorRegistry(auto_describe=False)
        for collector in collectors:
            scraped.register(collector)
        payload += generate_latest(scraped)
    return payload, CONTENT_TYPE_LATEST
