"""What operators use to see and steer the pipeline: the ops API, the dashboard, the CLI.

``install(app, settings)`` is the one call the web process's ``web.app.create_app`` makes:
it adds the ``pipeline_*`` gauges to ``/metrics`` and, only when ``OPS_API_TOKEN`` is set,
the ``/ops/api/`` and ``/ops/`` blueprints (without a token the whole ``/ops/`` tree
answers 404). Nothing here runs on the webhook path or opens a connection before an ops
request or a scrape; the gauges read the database at most once per
``ops.gauges.CACHE_SECONDS`` per process, however often ``/metrics`` is scraped.

The layers, each calling only the ones below it:

- ``api`` (JSON), ``dashboard`` (HTML), ``cli`` (``vfy-pipeline``): parse, ask, render;
- ``service``: the filters, the reads and the replays, with their errors (``stats``: the
  pipeline's state in one document);
- ``store``: one function per question on the caller's connection, running
- ``queries``: every SQL statement, written out;
- ``context``: where PostgreSQL and Redis come from; ``params``: the low-level parsers.
"""

from __future__ import annotations

from collections.abc import Sequence

from flask import Flask
from prometheus_client.registry import Collector

from config.settings import Settings

METRICS_COLLECTORS = "metrics_collectors"
"""``app.extensions`` key: extra Prometheus collectors the ``/metrics`` view renders."""


def collectors(app: Flask) -> Sequence[Collector]:
    """The collectors ``install`` added, for the web's ``/metrics`` to render."""
    found: Sequence[Collector] = app.extensions.get(METRICS_COLLECTORS, ())
    return found


def install(app: Flask, settings: Settings) -> None:
    """The context in ``app.extensions`` (the views read it with ``ops.context.current()``),
    the gauges, and the two blueprints when ``OPS_API_TOKEN`` is set."""
    from ops.context import EXTENSION, OpsContext
    from ops.gauges import PipelineCollector

    context = OpsContext(settings)
    app.extensions[EXTENSION] = context
    app.extensions.setdefault(METRICS_COLLECTORS, []).append(PipelineCollector(context))
    if settings.ops_api_token is None:
        return

    from ops.api import api
    from ops.dashboard import dashboard

    app.register_blueprint(api)
    app.register_blueprint(dashboard)
