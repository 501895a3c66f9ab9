"""The webhook as a Flask blueprint, and its installation on the web app.

``install(app, settings)`` builds the ``Intake`` (the secrets, the body limit, the
publisher), puts it in ``app.extensions[EXTENSION]`` and mounts the blueprint
(``receiver``) with one route, ``POST /webhooks/voucherify``, which answers what
``receiver.intake.answer`` decides. The web process's composition root (``web.app``) calls
it. No PostgreSQL here: the only thing the request touches is Redis, through the queue
contract (``workers.queue``).
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from config.settings import Settings
from receiver import metrics
from receiver.intake import WEBHOOK_PATH, Answer, Intake, answer, json_answer, too_large
from workers.queue import DeliveryPublisher

EXTENSION = "receiver"

receiver = Blueprint("receiver", __name__)


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
    # The webhook reads its body with its own cap (receiver.intake); this one is for the
    # other routes, with the same rule: a body filling limit + 1 bytes is too large.
    app.config["MAX_CONTENT_LENGTH"] = intake.max_body_bytes + 1
    app.extensions[EXTENSION] = intake
    app.register_blueprint(receiver)
    return intake


def intake() -> Intake:
    found: Intake = current_app.extensions[EXTENSION]
    return found


def response_of(it: Answer) -> Response:
    """The answer as a Flask ``Response`` (the same status, headers and bytes)."""
    return Response(it.body, status=it.code, headers=list(it.headers))


def json_response(status: int, payload: dict[str, Any], *extra: tuple[str, str]) -> Response:
    """A compact JSON answer, as every route of the web process gives them."""
    return response_of(json_answer(status, payload, *extra))


@receiver.post(WEBHOOK_PATH)
def receive_webhook() -> Response:
    started = time.perf_counter()
    response = response_of(answer(intake(), request.environ))
    metrics.ACK_LATENCY.observe(time.perf_counter() - started)
    return response


@receiver.app_errorhandler(RequestEntityTooLarge)
def too_large_answer(_: RequestEntityTooLarge) -> Response:
    return response_of(too_large(intake().max_body_bytes))
