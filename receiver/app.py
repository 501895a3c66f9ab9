"""The webhook receiver: verify, enqueue, answer. Nothing else happens in the request.

``create_app(settings)`` builds the Flask app; it reads no environment and opens no
connection until the first request (see ``receiver/wsgi.py`` for the entry point).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from config.settings import Settings
from ops import METRICS_COLLECTORS, register_ops
from receiver import metrics
from receiver.enqueue import BrokerUnavailable, DeliveryPublisher
from receiver.signature import verify_signature

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhooks/voucherify"
SIGNATURE_HEADER = "x-voucherify-signature"
RETRY_AFTER_SECONDS = "30"


def _json(status: int, payload: dict[str, Any], **headers: str) -> Response:
    response = Response(
        json.dumps(payload, separators=(",", ":")), status=status, mimetype="application/json"
    )
    for name, value in headers.items():
        response.headers[name.replace("_", "-")] = value
    return response


def _is_json_content_type(mimetype: str) -> bool:
    return mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    )


def check_database(database_url: str) -> None:
    import psycopg  # only /readyz touches PostgreSQL, never the webhook path

    with psycopg.connect(database_url, connect_timeout=2) as conn:
        conn.execute("SET statement_timeout = 2000")
        conn.execute("SELECT 1")


def create_app(
    settings: Settings,
    publisher: DeliveryPublisher | None = None,
    check_db: Callable[[str], None] = check_database,
) -> Flask:
    secrets = settings.require_webhook_secrets()
    if settings.redis_url is None or settings.database_url is None:
        raise ValueError("create_app needs settings with both URLs resolved")
    database_url = settings.database_url
    publisher = publisher or DeliveryPublisher(settings.redis_url, settings.enqueue_timeout_seconds)
    limit = settings.max_body_bytes

    app = Flask(__name__)
    # A declared Content-Length over the limit is answered 413 before anything is read.
    # A chunked body has no length: Werkzeug stops reading it at MAX_CONTENT_LENGTH, but
    # silently, handing back a truncated body (which would then fail the signature and
    # get a 401). So the cap is one byte over the limit, and a body that fills it is too
    # large: at most limit + 1 bytes are ever read, and a chunked body of exactly the
    # limit is still accepted.
    app.config["MAX_CONTENT_LENGTH"] = limit + 1
    app.extensions["publisher"] = publisher

    @app.post(WEBHOOK_PATH)
    def receive_webhook() -> Response:
        started = time.perf_counter()
        response = _receive()
        metrics.ACK_LATENCY.observe(time.perf_counter() - started)
        metrics.REQUESTS.labels(WEBHOOK_PATH, str(response.status_code)).inc()
        return response

    def _receive() -> Response:
        if not _is_json_content_type(request.mimetype):
            return _json(415, {"error": "unsupported_media_type"})
        declared = request.content_length
        if declared is not None and declared > limit:
            return _json(413, {"error": "body_too_large", "limit": limit})
        try:
            body = request.get_data(cache=False)
        except RequestEntityTooLarge:
            return _json(413, {"error": "body_too_large", "limit": limit})
        if len(body) > limit:
            return _json(413, {"error": "body_too_large", "limit": limit})
        if not verify_signature(body, request.headers.get(SIGNATURE_HEADER), secrets):
            log.info("delivery.rejected", extra={"reason": "invalid_signature"})
            return _json(401, {"error": "invalid_signature"})
        try:
            text = body.decode("utf-8")
            is_object = isinstance(json.loads(text), dict)
        except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            is_object = False
        if not is_object:
            log.info("delivery.rejected", extra={"reason": "not_a_json_object"})
            return _json(400, {"error": "body must be a JSON object"})
        delivery_id = uuid.uuid4().hex
        received_at = datetime.now(UTC).isoformat()
        try:
            publisher.publish(text, delivery_id, received_at)
        except BrokerUnavailable:
            metrics.ENQUEUE_FAILURES.inc()
            log.error("delivery.enqueue_gave_up", extra={"delivery_id": delivery_id})
            return _json(503, {"error": "broker_unavailable"}, Retry_After=RETRY_AFTER_SECONDS)
        log.debug("delivery.enqueued", extra={"delivery_id": delivery_id})
        return _json(202, {"status": "accepted", "delivery_id": delivery_id})

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_: RequestEntityTooLarge) -> Response:
        return _json(413, {"error": "body_too_large", "limit": limit})

    @app.get("/healthz")
    def healthz() -> Response:
        return _json(200, {"status": "ok"})

    @app.get("/readyz")
    def readyz() -> Response:
        failed: dict[str, str] = {}
        try:
            publisher.ping()
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            failed["redis"] = type(exc).__name__
        try:
            check_db(database_url)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            failed["postgres"] = type(exc).__name__
        if failed:
            return _json(503, {"status": "unavailable", "failed": failed})
        return _json(200, {"status": "ready"})

    @app.get("/metrics")
    def metrics_endpoint() -> Response:
        payload, content_type = metrics.render(app.extensions.get(METRICS_COLLECTORS, ()))
        return Response(payload, content_type=content_type)

    register_ops(app, settings)  # /ops/ (only with OPS_API_TOKEN) and the pipeline gauges
    return app
