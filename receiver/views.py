"""The webhook view: verify, enqueue, answer. Nothing else happens in the request.

A blueprint (``receiver``) with one route, ``POST /webhooks/voucherify``. It reads what it
needs from ``app.extensions[EXTENSION]`` (an ``Intake``: the secrets, the body limit and
the publisher), which ``install(app, settings)`` puts there; the web process's composition
root (``web.app``) calls it. No PostgreSQL here: the only thing the request touches is
Redis, through the queue contract (``workers.queue``).

Cheapest refusals first: the content type, the declared length and the signature header's
form (64 hex characters) are checked before the body is read, so a malformed header costs
neither the read nor an HMAC. A signed body is then read as a JSON object (``read_object``
of ``workers.queue.body``: UTF-8, nesting at most ``MAX_NESTING``, no NaN or Infinity) or
refused with a 400 naming why; whatever else goes wrong reading it is a 400, never a 5xx.
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
from receiver.signature import is_well_formed_signature, verify_signature
from workers.queue import BrokerUnavailable, DeliveryPublisher
from workers.queue.body import NOT_AN_OBJECT, NotAWebhook, read_object

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
        or DeliveryPublisher(
            settings.redis_url,
            settings.enqueue_timeout_seconds,
            settings.enqueue_min_replicas,
            settings.enqueue_replica_timeout_ms,
        ),
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


def _invalid_signature() -> Response:
    log.info("delivery.rejected", extra={"reason": "invalid_signature"})
    return json_response(401, {"error": "invalid_signature"})


def _receive(it: Intake) -> Response:
    limit = it.max_body_bytes
    if not _is_json_content_type(request.mimetype):
        return json_response(415, {"error": "unsupported_media_type"})
    declared = request.content_length
    if declared is not None and declared > limit:
        return _too_large(limit)
    signature = request.headers.get(SIGNATURE_HEADER)
    if not is_well_formed_signature(signature):
        return _invalid_signature()  # the body is not read, no HMAC is computed
    try:
        body = request.get_data(cache=False)
    except RequestEntityTooLarge:
        return _too_large(limit)
    if len(body) > limit:
        return _too_large(limit)
    if not verify_signature(body, signature, it.secrets):
        return _invalid_signature()
    try:
        text = read_object(body)
    except NotAWebhook as exc:
        log.info("delivery.rejected", extra={"reason": "not_a_webhook", "detail": str(exc)})
        return json_response(400, {"error": str(exc)})
    except Exception as exc:  # noqa: BLE001 - the edge: no body is ever a 5xx
        log.warning(
            "delivery.rejected", extra={"reason": "unparsable", "detail": type(exc).__name__}
        )
        return json_response(400, {"error": NOT_AN_OBJECT})
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
