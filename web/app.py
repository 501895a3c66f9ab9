"""The web process's Flask app: the receiver and the ops tools, mounted side by side.

``create_app(settings)`` reads no environment and opens no connection until a request
needs one (``web/wsgi.py`` is the entry point). It mounts:

- the receiver (``POST /webhooks/voucherify``; Redis only): its blueprint,
- the ops blueprints (``/ops/api/``, ``/ops/``; only with ``OPS_API_TOKEN``) and the
  ``pipeline_*`` gauges,
- ``/healthz`` (the process answers), ``/readyz`` (Redis and PostgreSQL answer, asked at
  most once a second per process: ``web.health``) and ``/metrics`` (only with
  ``Authorization: Bearer $METRICS_TOKEN`` when that is set: ``web.metrics``).

The receiver and ops never import each other; this module is where they meet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask, Response, request
from werkzeug.wrappers import Response as BaseResponse

import ops
import receiver.metrics
import receiver.views
from config.settings import Settings
from ops.auth import bearer_matches
from web import health, metrics
from workers.queue import DeliveryPublisher

COUNTED_BLUEPRINTS = frozenset({"receiver", "ops_api", "ops_dashboard"})


def create_app(
    settings: Settings,
    publisher: DeliveryPublisher | None = None,
    check_db: Callable[[str], None] = health.check_database,
) -> Flask:
    app = Flask(__name__)
    intake = receiver.views.install(app, settings, publisher)
    ops.install(app, settings)  # /ops/ (only with OPS_API_TOKEN) and the pipeline gauges
    app.after_request(_count_request)
    readiness = health.Readiness(
        {"redis": intake.publisher.ping, "postgres": lambda: check_db(settings.database_url)}
    )

    @app.get("/healthz")
    def healthz() -> Response:
        return receiver.views.json_response(200, {"status": "ok"})

    @app.get("/readyz")
    def readyz() -> Response:
        """Ready or not, and what failed; never where a server is: the Redis primary's
        address is shown only to a caller with the ops token (``redis_primary``)."""
        failed = readiness.failures()
        body: dict[str, Any] = (
            {"status": "unavailable", "failed": failed} if failed else {"status": "ready"}
        )
        token = settings.ops_api_token
        if token and bearer_matches(request.headers.get("Authorization"), token):
            body["redis_primary"] = intake.publisher.primary()  # no I/O: the address last reached
        return receiver.views.json_response(503 if failed else 200, body)

    @app.get("/metrics")
    def metrics_endpoint() -> Response:
        if not metrics.authorized(request.headers.get("Authorization"), settings.metrics_token):
            return metrics.unauthorized()
        payload, content_type = metrics.render(ops.collectors(app))
        return Response(payload, content_type=content_type)

    return app


def _count_request(response: BaseResponse) -> BaseResponse:
    """Answers of the webhook and ops routes, by the route's template (never the raw path)."""
    if request.blueprint in COUNTED_BLUEPRINTS and request.url_rule is not None:
        receiver.metrics.answered(request.url_rule.rule, response.status_code)
    return response
