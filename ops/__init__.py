"""What operators use to see and steer the pipeline: the ops API, the dashboard, the CLI.

``register_ops(app, settings)`` is the one call ``receiver.app.create_app`` makes: it adds
the ``pipeline_*`` gauges to ``/metrics`` and, only when ``OPS_API_TOKEN`` is set, the
``/ops/api/`` and ``/ops/`` blueprints (without a token the whole ``/ops/`` tree answers
404). Nothing here runs on the webhook path or opens a connection before an ops request or
a scrape.
"""

from __future__ import annotations

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from config.settings import Settings

METRICS_COLLECTORS = "metrics_collectors"
"""``app.extensions`` key: extra Prometheus collectors the ``/metrics`` view renders."""


def register_ops(app: Flask, settings: Settings) -> None:
    from ops.context import OpsContext
    from ops.gauges import PipelineCollector

    context = OpsContext(settings)
    app.extensions.setdefault(METRICS_COLLECTORS, []).append(PipelineCollector(context))
    app.extensions["ops_context"] = context
    if settings.ops_api_token is None:
        return

    from ops.api import API_PREFIX, http_error, make_api
    from ops.dashboard import make_dashboard

    app.register_blueprint(make_api(context))
    app.register_blueprint(make_dashboard(context))

    def api_routing_error(exc: HTTPException) -> HTTPException | Response:
        """Routing errors (unknown path, wrong method) under /ops/api/ answer JSON too."""
        if request.path.startswith(API_PREFIX + "/"):
            return http_error(exc)
        return exc

    app.register_error_handler(404, api_routing_error)
    app.register_error_handler(405, api_routing_error)
