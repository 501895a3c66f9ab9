"""The webhook view: verify, enqueue, answer. Nothing else happens in the request.

A blueprint (``receiver``) with one route, ``POST /webhooks/voucherify``. It reads what it
needs from ``app.extensions[EXTENSION]`` (an ``Intake``: the secrets, the body limit and
the publisher), which ``install(app, settings)`` puts there; the web process's composition
root (``web.app``) calls it. No PostgreSQL here: the only thing the request touches is
Redis, through the queue contract (``workers.queue``).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from config.settings import Settings
from receiver import metrics
from receiver.signature import verify_signature
from workers.queue import BrokerUnavailable, DeliveryPublisher

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhooks/voucherify"
SIGNATURE_HEADER = "x-voucherify-signature"
RETRY_AFTER_SECONDS = "30"
EXTENSION = "receiver"

receiver = Blueprint("receiver", __name__)


@dataclass(frozen=True, slots=True)
class Intake:
    """What the webhook view needs, built once per app."""

    secrets: tuple[bytes, ...]
    max_body_bytes: int
    publisher: DeliveryPublisher


def install(app: Flask, settings: Settings, publisher: DeliveryPublisher | None = None) -> Intake:
    """Mount the webhook route on ``app``, publishing through ``publisher`` (or a new one)."""
    intake = Intake(
        secrets=settings.require_webhook_secrets(),
        max_body_bytes=settings.max_body_bytes,
        publisher=publisher
        or DeliveryPublisher(settings.redis_url, settings.enqueue_timeout_seconds),
    )
    # A declared Content-Length over the limit is answered 413 before anything is read.
    # A chunked body has no length: Werkzeug stops reading it at MAX_CONTENT_LENGTH, but
    # silently, handing back a truncated body (which would then fail the signature and
    # get a 401). So the cap is one byte over the limit, and a body that fills it is too
    # large: at most limit + 1 bytes are ever read, and a chunked body of exactly the
    # limit is still accepted.
    app.config["MAX_CONTENT_LENGTH"] = intake.max_body_bytes + 1
    app.extensions[EXTENSION] = intake
    app.register_blueprint(receiver)
    return intake


def intake() -> Intake:
    found: Intake = current_app.extensions[EXTENSION]
    return found


def json_response(status: int, payload: dict[str, Any], **headers: str) -> Response:
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


@receiver.post(WEBHOOK_PATH)
def receive_webhook() -> Response:
    started = time.perf_counter()
    response = _receive(intake())
    metrics.ACK_LATENCY.observe(time.perf_counter() - started)
    return response


def _too_large(limit: int) -> Response:
    return json_response(413, {"error": "body_too_large", "limit": limit})


def _receive(it: Intake) -> Response:
    limit = it.max_body_bytes
    if not _is_json_content_type(request.mimetype):
        return json_response(415, {"error": "unsupported_media_type"})
    declared = request.content_length
    if declared is not None and declared > limit:
        return _too_large(limit)
    try:
        body = request.get_data(cache=False)
    except RequestEntityTooLarge:
        return _too_large(limit)
    if len(body) > limit:
        return _too_large(limit)
    if not verify_signature(body, request.headers.get(SIGNATURE_HEADER), it.secrets):
        log.info("delivery.rejected", extra={"reason": "invalid_signature"})
        return json_response(401, {"error": "invalid_signature"})
    try:
        text = body.decode("utf-8")
        is_object = isinstance(json.loads(text), dict)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        is_object = False
    if not is_object:
        log.info("delivery.rejected", extra={"reason": "not_a_json_object"})
        return json_response(400, {"error": "body must be a JSON object"})
    delivery_id = uuid.uuid4().hex
    received_at = datetime.now(UTC).isoformat()
    try:
        it.publisher.publish(text, delivery_id, received_at)
    except BrokerUnavailable:
        metrics.ENQUEUE_FAILURES.inc()
        log.error("delivery.enqueue_gave_up", extra={"delivery_id": delivery_id})
        return json_response(503, {"error": "broker_unavailable"}, Retry_After=RETRY_AFTER_SECONDS)
    log.debug("delivery.enqueued", extra={"delivery_id": delivery_id})
    return json_response(202, {"status": "accepted", "delivery_id": delivery_id})


@receiver.app_errorhandler(RequestEntityTooLarge)
def too_large(_: RequestEntityTooLarge) -> Response:
    return _too_large(intake().max_body_bytes)
