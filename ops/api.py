"""The ops API under /ops/api/ (see docs/contract.md, "Ops API"): JSON in, JSON out.

Every request needs ``Authorization: Bearer $OPS_API_TOKEN`` (401 otherwise). Errors are
JSON: ``{"error": "not_found"}`` for unknown ids, ``invalid_parameter`` (400) for a bad
limit, cursor, time or filter, ``payload_pruned`` (409) for a replay of an event whose
payload retention removed, ``broker_unavailable`` / ``database_unavailable`` (503).
Lists take ``limit`` (default 50, max 500) and ``cursor`` (the ``next_cursor`` of the
previous page) and answer ``{"items": [...], "next_cursor": ... | null}``.

Each view parses its query with ``ops.service``'s filters, asks the service, and answers
the document; the context comes from the app (``ops.context.current()``).
"""

from __future__ import annotations

import json
import logging
from typing import Any, TypeVar

import psycopg
from flask import Blueprint, Response, request
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as BaseResponse

from ops import service
from ops.auth import bearer_matches
from ops.context import current, current_token
from ops.params import ParamError, Query, dumps, parse_bool
from ops.stats import pipeline_stats
from workers.jobs.flag_actions import ActionRefused

log = logging.getLogger(__name__)

R = TypeVar("R", bound=BaseResponse)

API_PREFIX = "/ops/api"

api = Blueprint("ops_api", __name__, url_prefix=API_PREFIX)


# --- answers ----------------------------------------------------------------------------


def json_response(status: int, document: Any, **headers: str) -> Response:
    response = Response(dumps(document), status=status, mimetype="application/json")
    for name, value in headers.items():
        response.headers[name.replace("_", "-")] = value
    return response


def ok(document: Any) -> Response:
    return json_response(200, document)


def error(status: int, code: str, **fields: Any) -> Response:
    headers = {"Retry_After": "5"} if status == 503 else {}
    return json_response(status, {"error": code, **fields}, **headers)


def http_error(exc: HTTPException) -> Response:
    """A routing or protocol error (404, 405, 400 ...) as JSON."""
    code = "not_found" if exc.code == 404 else (exc.name or "error").lower().replace(" ", "_")
    response = error(exc.code or 500, code)
    if exc.code == 405 and exc.valid_methods:  # type: ignore[attr-defined]
        response.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
    return response


def no_store(response: R) -> R:
    """Nothing the ops tools answer may be cached."""
    response.headers["Cache-Control"] = "no-store"
    return response


def query() -> Query:
    """The request's query string, every value of each name."""
    return request.args.to_dict(flat=False)


def json_body() -> dict[str, Any]:
    raw = request.get_data(cache=False)
    if not raw.strip():
        return {}
    try:
        document = json.loads(raw)
    except ValueError:
        raise ParamError("body", "not JSON") from None
    if not isinstance(document, dict):
        raise ParamError("body", "expected a JSON object")
    return document


# --- guard and errors -------------------------------------------------------------------


@api.before_request
def authenticate() -> Response | None:
    if not bearer_matches(request.headers.get("Authorization"), current_token()):
        log.warning("ops.unauthorized", extra={"path": request.path})
        response = error(401, "unauthorized")
        response.headers["WWW-Authenticate"] = 'Bearer realm="ops"'
        return response
    return None


api.after_request(no_store)


@api.app_errorhandler(404)
@api.app_errorhandler(405)
def routing_error(exc: HTTPException) -> HTTPException | Response:
    """Routing errors (unknown path, wrong method) under /ops/api/ answer JSON too."""
    if request.path.startswith(API_PREFIX + "/"):
        return http_error(exc)
    return exc


@api.errorhandler(ParamError)
def invalid(exc: ParamError) -> Response:
    return error(400, "invalid_parameter", parameter=exc.name, detail=exc.problem)


@api.errorhandler(service.NotFound)
def not_found(_: service.NotFound) -> Response:
    return error(404, "not_found")


@api.errorhandler(service.PayloadPruned)
def pruned(_: service.PayloadPruned) -> Response:
    return error(409, "payload_pruned", detail="the event's payload was removed by retention")


@api.errorhandler(ActionRefused)
def action_refused(exc: ActionRefused) -> Response:
    headers = {"Retry_After": str(exc.retry_after)} if exc.retry_after is not None else {}
    return json_response(exc.status, {"error": exc.code, "detail": exc.detail}, **headers)


@api.errorhandler(service.BrokerUnavailable)
def broker_down(exc: service.BrokerUnavailable) -> Response:
    log.error("ops.replay_failed", extra={"error": str(exc)})
    return error(503, "broker_unavailable")


@api.errorhandler(psycopg.OperationalError)
def database_down(exc: psycopg.OperationalError) -> Response:
    log.error("ops.database_unavailable", extra={"error": type(exc).__name__})
    return error(503, "database_unavailable")


@api.errorhandler(HTTPException)
def http(exc: HTTPException) -> Response:
    return http_error(exc)


@api.errorhandler(Exception)
def crashed(exc: Exception) -> Response:  # the one broad catch, at the edge
    log.exception("ops.api_crashed", extra={"path": request.path})
    return error(500, "internal_error")


# --- events -----------------------------------------------------------------------------


@api.get("/events")
def list_events() -> Response:
    return ok(service.events(current(), service.EventFilter.parse(query())).as_dict())


@api.get("/events/<event_id>")
def show_event(event_id: str) -> Response:
    return ok(service.event(current(), event_id))


@api.post("/events/<event_id>/replay")
def replay_event(event_id: str) -> Response:
    dry_run = bool(parse_bool("dry_run", request.args.get("dry_run")))
    step = service.replay_event(current(), event_id, dry_run=dry_run)
    return ok({"status": step.action, **step.as_dict()})


# --- orders, redemptions, ledger --------------------------------------------------------


@api.get("/orders/<order_id>")
def show_order(order_id: str) -> Response:
    return ok(service.order(current(), order_id))


@api.get("/redemptions/<redemption_id>")
def show_redemption(redemption_id: str) -> Response:
    return ok(service.redemption(current(), redemption_id))


@api.get("/customers/<customer_id>/ledger")
def show_ledger(customer_id: str) -> Response:
    return ok(service.ledger(current(), customer_id, service.Paging.parse(query())))


# --- flags ------------------------------------------------------------------------------


@api.get("/flags")
def list_flags() -> Response:
    return ok(service.flags(current(), service.FlagFilter.parse(query())).as_dict())


@api.get("/flags/<int:flag_id>")
def show_flag(flag_id: int) -> Response:
    return ok(service.flag(current(), flag_id))


@api.post("/flags/<int:flag_id>/resolve")
def resolve_flag(flag_id: int) -> Response:
    return ok(service.resolve_flag(current(), flag_id, json_body().get("note")))


@api.post("/flags/<int:flag_id>/actions")
def flag_action(flag_id: int) -> Response:
    """``{"kind": "compensate" | "retry" | "settle", "confirm": false}`` previews, ``true``
    acts; ``by`` names who asks (the audit log's ``requested_by``; default ``ops-api``)."""
    return ok(service.flag_action(current(), flag_id, json_body(), by="ops-api"))


# --- dead letters -----------------------------------------------------------------------


@api.get("/dead-letters")
def list_dead_letters() -> Response:
    found = service.dead_letters(current(), service.DeadLetterFilter.parse(query()))
    return ok(found.as_dict())


@api.get("/dead-letters/<int:dead_letter_id>")
def show_dead_letter(dead_letter_id: int) -> Response:
    return ok(service.dead_letter(current(), dead_letter_id))


@api.post("/dead-letters/<int:dead_letter_id>/replay")
def replay_dead_letter(dead_letter_id: int) -> Response:
    step = service.replay_dead_letter(current(), dead_letter_id)
    return ok({"status": step.action, "event_id": step.event_id, "delivery_id": step.delivery_id})


# --- search and stats -------------------------------------------------------------------


@api.get("/search")
def search() -> Response:
    return ok(service.search(current(), request.args.get("q")))


@api.get("/stats")
def stats() -> Response:
    return ok(pipeline_stats(current()))
