"""The ops API under /ops/api/ (see CONTRACT.md, "Ops API"): JSON in, JSON out.

Every request needs ``Authorization: Bearer $OPS_API_TOKEN`` (401 otherwise). Errors are
JSON: ``{"error": "not_found"}`` for unknown ids, ``invalid_parameter`` (400) for a bad
limit, cursor, time or filter, ``payload_pruned`` (409) for a replay of an event whose
payload retention removed, ``broker_unavailable`` / ``database_unavailable`` (503).
Lists take ``limit`` (default 50, max 500) and ``cursor`` (the ``next_cursor`` of the
previous page) and answer ``{"items": [...], "next_cursor": ... | null}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from flask import Blueprint, Response, request
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as BaseResponse

from ops import queries, replay
from ops.auth import bearer_matches
from ops.context import OpsContext
from ops.params import (
    FLAG_CATEGORIES,
    FLAG_STATUSES,
    ParamError,
    decode_event_cursor,
    dumps,
    encode_event_cursor,
    parse_bool,
    parse_choice,
    parse_id,
    parse_limit,
    parse_statuses,
    parse_time,
)
from ops.stats import pipeline_stats
from receiver import metrics

log = logging.getLogger(__name__)

R = TypeVar("R", bound=BaseResponse)

API_PREFIX = "/ops/api"
MAX_NOTE_CHARS = 2000


def json_response(status: int, document: Any, **headers: str) -> Response:
    response = Response(dumps(document), status=status, mimetype="application/json")
    for name, value in headers.items():
        response.headers[name.replace("_", "-")] = value
    return response


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


def count_request(response: R) -> R:
    """Requests by path (the route's template, never the raw path) and code."""
    rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
    metrics.REQUESTS.labels(rule, str(response.status_code)).inc()
    response.headers["Cache-Control"] = "no-store"
    return response


def _json_body() -> dict[str, Any]:
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


def _note(body: dict[str, Any]) -> str | None:
    note = body.get("note")
    if note is not None and not isinstance(note, str):
        raise ParamError("note", "expected a string")
    if note is not None and len(note) > MAX_NOTE_CHARS:
        raise ParamError("note", f"at most {MAX_NOTE_CHARS} characters")
    return note


def make_api(context: OpsContext) -> Blueprint:
    token = context.settings.ops_api_token
    assert token is not None
    api = Blueprint("ops_api", __name__, url_prefix=API_PREFIX)

    @api.before_request
    def authenticate() -> Response | None:
        if not bearer_matches(request.headers.get("Authorization"), token):
            log.warning("ops.unauthorized", extra={"path": request.path})
            response = error(401, "unauthorized")
            response.headers["WWW-Authenticate"] = 'Bearer realm="ops"'
            return response
        return None

    api.after_request(count_request)

    @api.errorhandler(ParamError)
    def invalid(exc: ParamError) -> Response:
        return error(400, "invalid_parameter", parameter=exc.name, detail=exc.problem)

    @api.errorhandler(replay.NotFound)
    def not_found(_: replay.NotFound) -> Response:
        return error(404, "not_found")

    @api.errorhandler(replay.PayloadPruned)
    def pruned(_: replay.PayloadPruned) -> Response:
        return error(409, "payload_pruned", detail="the event's payload was removed by retention")

    @api.errorhandler(replay.BrokerUnavailable)
    def broker_down(exc: replay.BrokerUnavailable) -> Response:
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

    def found(row: dict[str, Any] | None) -> Response:
        if row is None:
            return error(404, "not_found")
        return json_response(200, row)

    def read(fn: Callable[[queries.Conn], Any]) -> Any:
        with context.transaction() as conn:
            return fn(conn)

    # --- events ---------------------------------------------------------------------

    @api.get("/events")
    def list_events() -> Response:
        args = request.args
        rows, cursor = read(
            lambda conn: queries.events(
                conn,
                statuses=parse_statuses(args.getlist("status")),
                event_type=args.get("type") or None,
                since=parse_time("since", args.get("since")),
                until=parse_time("until", args.get("until")),
                cursor=decode_event_cursor(args.get("cursor")),
                limit=parse_limit(args.get("limit")),
            )
        )
        return json_response(200, {"items": rows, "next_cursor": encode_event_cursor(cursor)})

    @api.get("/events/<event_id>")
    def show_event(event_id: str) -> Response:
        return found(read(lambda conn: queries.event(conn, event_id)))

    @api.post("/events/<event_id>/replay")
    def replay_event(event_id: str) -> Response:
        dry_run = bool(parse_bool("dry_run", request.args.get("dry_run")))
        step = replay.replay_event(context, event_id, dry_run=dry_run)
        status = "requeued" if step.action == "requeued" else step.action
        return json_response(200, {"status": status, **step.as_dict()})

    # --- orders, redemptions, ledger ------------------------------------------------

    @api.get("/orders/<order_id>")
    def show_order(order_id: str) -> Response:
        return found(read(lambda conn: queries.order(conn, order_id)))

    @api.get("/redemptions/<redemption_id>")
    def show_redemption(redemption_id: str) -> Response:
        return found(read(lambda conn: queries.redemption(conn, redemption_id)))

    @api.get("/customers/<customer_id>/ledger")
    def show_ledger(customer_id: str) -> Response:
        cursor = parse_id("cursor", request.args.get("cursor"))
        limit = parse_limit(request.args.get("limit"))

        def ledger(conn: queries.Conn) -> dict[str, Any] | None:
            if not queries.customer_known(conn, customer_id):
                return None
            return queries.ledger(conn, customer_id, cursor=cursor, limit=limit)

        return found(read(ledger))

    # --- flags ----------------------------------------------------------------------

    @api.get("/flags")
    def list_flags() -> Response:
        args = request.args
        result = read(
            lambda conn: queries.flags(
                conn,
                status=parse_choice("status", args.get("status"), FLAG_STATUSES),
                failure_code=args.get("failure_code") or args.get("code") or None,
                category=parse_choice("category", args.get("category"), FLAG_CATEGORIES),
                redemption_id=args.get("redemption_id") or None,
                cursor=parse_id("cursor", args.get("cursor")),
                limit=parse_limit(args.get("limit")),
            )
        )
        return json_response(200, result.as_dict())

    @api.get("/flags/<int:flag_id>")
    def show_flag(flag_id: int) -> Response:
        return found(read(lambda conn: queries.flag(conn, flag_id)))

    @api.post("/flags/<int:flag_id>/resolve")
    def resolve_flag(flag_id: int) -> Response:
        note = _note(_json_body())
        flag = read(lambda conn: queries.resolve_flag(conn, flag_id, note))
        if flag is not None:
            log.info("ops.flag_resolved", extra={"flag_id": flag_id})
        return found(flag)

    # --- dead letters ---------------------------------------------------------------

    @api.get("/dead-letters")
    def list_dead_letters() -> Response:
        args = request.args
        result = read(
            lambda conn: queries.dead_letters(
                conn,
                event_type=args.get("type") or None,
                replayed=parse_bool("replayed", args.get("replayed")),
                cursor=parse_id("cursor", args.get("cursor")),
                limit=parse_limit(args.get("limit")),
            )
        )
        return json_response(200, result.as_dict())

    @api.get("/dead-letters/<int:dead_letter_id>")
    def show_dead_letter(dead_letter_id: int) -> Response:
        return found(read(lambda conn: queries.dead_letter(conn, dead_letter_id)))

    @api.post("/dead-letters/<int:dead_letter_id>/replay")
    def replay_dead_letter(dead_letter_id: int) -> Response:
        step = replay.replay_dead_letter(context, dead_letter_id)
        return json_response(
            200,
            {"status": "requeued", "event_id": step.event_id, "delivery_id": step.delivery_id},
        )

    # --- search and stats -----------------------------------------------------------

    @api.get("/search")
    def search() -> Response:
        q = (request.args.get("q") or "").strip()
        if not q:
            raise ParamError("q", "give an event, delivery, order, redemption or customer id")
        return json_response(200, read(lambda conn: queries.search(conn, q)))

    @api.get("/stats")
    def stats() -> Response:
        return json_response(200, pipeline_stats(context))

    return api
