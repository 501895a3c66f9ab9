"""What the webhook answers, computed from the WSGI environ: verify, check, enqueue.

The one place that decides a webhook's answer; the Flask view of ``receiver.views`` turns
it into a ``Response`` and adds nothing. Every code, body and header of docs/contract.md's
Receiver table is built here, once, as bytes.

Cheapest refusals first: the content type, the declared length and the signature header's
form (64 hex characters) are checked before the body is read, so a malformed header costs
neither the read nor an HMAC. A correctly signed body is then always accepted: read by the
body rule (``read_webhook`` of ``workers.queue.body``), and enqueued whether it keeps the
rule or not (one that breaks it is logged and counted here, and dead-lettered by the
worker: a 4xx would make Voucherify retry it 12 times, then disable the endpoint). A body
whose event id was accepted before is answered with the first delivery's id, nothing
enqueued (the accept script remembers the id). 401s are counted, and logged at most once
a minute per source address.

The body is read as Werkzeug reads it for Flask (``get_input_stream`` with a cap of the
limit + 1 bytes): a declared Content-Length over the limit is answered 413 before anything
is read, and a chunked body, which has no length, is read up to one byte past the limit so
that a body filling the cap is too large while one of exactly the limit is accepted.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.http import HTTP_STATUS_CODES, parse_options_header
from werkzeug.wsgi import get_content_length, get_input_stream

from receiver import metrics
from receiver.signature import is_well_formed_signature, verify_signature
from workers.queue import BrokerUnavailable, DeliveryPublisher
from workers.queue.body import read_webhook

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/webhooks/voucherify"
SIGNATURE_HEADER = "x-voucherify-signature"
SIGNATURE_ENVIRON = "HTTP_X_VOUCHERIFY_SIGNATURE"
RETRY_AFTER_SECONDS = "30"
JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Intake:
    """What the webhook needs, built once per app."""

    secrets: tuple[bytes, ...]
    max_body_bytes: int
    publisher: DeliveryPublisher


@dataclass(frozen=True, slots=True)
class Answer:
    """One HTTP answer, ready for the wire: WSGI status line, headers, body."""

    code: int
    body: bytes
    headers: tuple[tuple[str, str], ...]

    @property
    def status(self) -> str:
        """The status line as Werkzeug writes it (``202 ACCEPTED``)."""
        return _STATUS_LINES[self.code]


_STATUS_LINES = {code: f"{code} {HTTP_STATUS_CODES[code].upper()}" for code in HTTP_STATUS_CODES}


def json_answer(code: int, payload: dict[str, Any], *extra: tuple[str, str]) -> Answer:
    """``payload`` as compact JSON, with the headers a Flask JSON ``Response`` has."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Answer(code, body, (("Content-Type", JSON), ("Content-Length", str(len(body))), *extra))


UNSUPPORTED_MEDIA_TYPE = json_answer(415, {"error": "unsupported_media_type"})
INVALID_SIGNATURE = json_answer(401, {"error": "invalid_signature"})
BROKER_UNAVAILABLE = json_answer(
    503, {"error": "broker_unavailable"}, ("Retry-After", RETRY_AFTER_SECONDS)
)
# The 202's body around its delivery id (32 hex characters), as json_answer would build it.
_ACCEPTED_HEAD, _ACCEPTED_TAIL = json_answer(
    202, {"status": "accepted", "delivery_id": "%s"}
).body.split(b"%s")
_ACCEPTED_LENGTH = str(len(_ACCEPTED_HEAD) + len(uuid.UUID(int=0).hex) + len(_ACCEPTED_TAIL))
_ACCEPTED_HEADERS = (("Content-Type", JSON), ("Content-Length", _ACCEPTED_LENGTH))


def too_large(limit: int) -> Answer:
    return json_answer(413, {"error": "body_too_large", "limit": limit})


def is_json_content_type(content_type: str | None) -> bool:
    """Whether ``Content-Type`` is JSON: ``application/json`` or ``application/*+json``,
    parameters aside, in any case (Werkzeug's ``Request.mimetype``)."""
    if content_type == JSON:
        return True  # what Voucherify sends: no parsing
    mimetype = parse_options_header(content_type)[0].lower()
    return mimetype == JSON or (mimetype.startswith("application/") and mimetype.endswith("+json"))


def answer(it: Intake, environ: dict[str, Any]) -> Answer:
    """The answer to a ``POST /webhooks/voucherify`` whose WSGI environ is ``environ``.

    Raises the ``HTTPException`` Werkzeug raises when the client went away mid-body
    (``ClientDisconnected``, a 400): each adapter answers it as Flask does.
    """
    limit = it.max_body_bytes
    if not is_json_content_type(environ.get("CONTENT_TYPE")):
        return UNSUPPORTED_MEDIA_TYPE
    declared = get_content_length(environ)
    if declared is not None and declared > limit:
        return too_large(limit)
    signature = environ.get(SIGNATURE_ENVIRON)
    if not is_well_formed_signature(signature):
        return _invalid_signature(environ)  # the body is not read, no HMAC is computed
    try:
        body = get_input_stream(environ, max_content_length=limit + 1).read()
    except RequestEntityTooLarge:
        return too_large(limit)
    if len(body) > limit:
        return too_large(limit)
    if not verify_signature(body, signature, it.secrets):
        return _invalid_signature(environ)
    webhook = read_webhook(body)  # never raises: a signed body is always enqueued
    if webhook.refused is not None:
        metrics.UNPROCESSABLE.inc()
        log.warning("delivery.unprocessable", extra={"reason": webhook.refused})
    delivery_id = uuid.uuid4().hex
    received_at = datetime.now(UTC).isoformat()
    try:
        carried_by = it.publisher.publish(webhook.text, delivery_id, received_at, webhook.event_id)
    except BrokerUnavailable:
        metrics.ENQUEUE_FAILURES.inc()
        log.error("delivery.enqueue_gave_up", extra={"delivery_id": delivery_id})
        return BROKER_UNAVAILABLE
    if carried_by != delivery_id:
        metrics.REPEATS.inc()
        log.debug("delivery.repeat", extra={"delivery_id": carried_by})
        return accepted(carried_by)
    log.debug("delivery.enqueued", extra={"delivery_id": delivery_id})
    return Answer(202, _ACCEPTED_HEAD + delivery_id.encode() + _ACCEPTED_TAIL, _ACCEPTED_HEADERS)


def accepted(delivery_id: str) -> Answer:
    return json_answer(202, {"status": "accepted", "delivery_id": delivery_id})


REJECTION_LOG_SECONDS = 60.0
"""A source's 401s are logged at most once in this long (each is counted in the metrics)."""
_last_logged: dict[str, tuple[float, int]] = {}
"""source -> (when its last 401 was logged, 401s since then): per process, bounded."""
_MAX_SOURCES = 10_000


def _invalid_signature(environ: dict[str, Any]) -> Answer:
    """The 401, counted; logged at most once a minute per source (a flood of them must not
    write the disk full), with how many were not logged since."""
    metrics.INVALID_SIGNATURES.inc()
    source = str(environ.get("REMOTE_ADDR") or "unknown")
    now = time.monotonic()
    last, suppressed = _last_logged.get(source, (-REJECTION_LOG_SECONDS, 0))
    if now - last < REJECTION_LOG_SECONDS:
        _last_logged[source] = (last, suppressed + 1)
        return INVALID_SIGNATURE
    if len(_last_logged) >= _MAX_SOURCES:
        _last_logged.clear()
    _last_logged[source] = (now, 0)
    log.info(
        "delivery.rejected",
        extra={"reason": "invalid_signature", "source": source, "not_logged": suppressed},
    )
    return INVALID_SIGNATURE
