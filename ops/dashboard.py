"""The operators' dashboard at /ops/: server-rendered HTML, no JavaScript at all.

Same token as the API: the login form takes it once and sets a session cookie (see
``ops.auth``). Pages: the overview (events per minute by outcome, lag, queue, open flags
with a resolve button, dead letters with a replay button, what failed today), search by
event, delivery, order, redemption, voucher code or customer id, and one page per event,
redemption, order and customer. Every POST carries a CSRF field and answers with a 303
back to the page it came from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import psycopg
from flask import Blueprint, make_response, redirect, render_template, request
from werkzeug.wrappers import Response

from ops import queries, replay
from ops.api import count_request
from ops.auth import (
    SESSION_COOKIE,
    SESSION_SECONDS,
    csrf_valid,
    csrf_value,
    session_valid,
    session_value,
    token_matches,
)
from ops.context import OpsContext
from ops.params import (
    FLAG_CATEGORIES,
    FLAG_STATUSES,
    ParamError,
    decode_event_cursor,
    encode_event_cursor,
    parse_bool,
    parse_choice,
    parse_id,
    parse_limit,
    parse_statuses,
    parse_time,
)
from ops.stats import pipeline_stats

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
CHART_MINUTES = 30
MAX_BULK_REPLAY = 500

SECURITY_HEADERS = {
    # No script may run on these pages; styles are inline; forms only post here.
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

NOTICES = {
    "flag_resolved": "Flag {id} resolved.",
    "requeued": "Event {id} re-queued: the worker applies it again.",
    "requeued_many": "{id} events re-queued.",
    "payload_pruned": "Event {id} cannot be replayed: its payload was removed by retention.",
    "broker_unavailable": "Redis did not take the message; nothing changed. Try again.",
    "not_found": "{id} was not found.",
    "expired_form": "The form had expired; nothing changed. Try again.",
}


def _safe_next(raw: str | None) -> str:
    """Only our own pages: never an open redirect."""
    if raw and raw.startswith("/ops/") and not raw.startswith("//") and "\\" not in raw:
        return raw
    return "/ops/"


def _with_notice(target: str, notice: str, ident: object = "") -> str:
    parts = urlsplit(target)
    query = "&".join(
        p for p in parts.query.split("&") if p and not p.startswith(("notice=", "id="))
    )
    extra = urlencode({"notice": notice, "id": str(ident)})
    return urlunsplit(parts._replace(query=f"{query}&{extra}" if query else extra))


def fmt_time(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") + "Z"


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


def make_dashboard(context: OpsContext) -> Blueprint:
    token = context.settings.ops_api_token
    assert token is not None
    board = Blueprint("ops_dashboard", __name__, url_prefix="/ops", template_folder=str(TEMPLATES))
    board.add_app_template_filter(fmt_time, "ops_time")
    board.add_app_template_filter(fmt_seconds, "ops_secs")
    public = {"ops_dashboard.login", "ops_dashboard.login_form"}

    def session() -> str | None:
        value = request.cookies.get(SESSION_COOKIE)
        return value if session_valid(value, token) else None

    def page(template: str, status: int = 200, **values: Any) -> Response:
        current = session()
        notice = NOTICES.get(request.args.get("notice", ""), "")
        html = render_template(
            f"ops/{template}",
            csrf=csrf_value(token, current) if current else "",
            here=request.full_path.rstrip("?"),
            notice=notice.format(id=request.args.get("id", "")) if notice else "",
            notice_kind=request.args.get("notice", ""),
            **values,
        )
        return make_response(html, status)

    @board.before_request
    def authenticate() -> Response | None:
        if request.endpoint in public:
            return None
        current = session()
        if current is None:
            return page("login.html", 401, next=request.full_path.rstrip("?"), failed=False)
        if request.method == "POST" and not csrf_valid(request.form.get("csrf"), token, current):
            log.warning("ops.csrf_refused", extra={"path": request.path})
            return redirect(_with_notice(_safe_next(request.form.get("next")), "expired_form"), 303)
        return None

    @board.after_request
    def harden(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return count_request(response)

    @board.errorhandler(psycopg.OperationalError)
    def database_down(exc: psycopg.OperationalError) -> Response:
        log.error("ops.database_unavailable", extra={"error": type(exc).__name__})
        return page("error.html", 503, message="PostgreSQL does not answer; try again shortly.")

    @board.errorhandler(ParamError)
    def invalid(exc: ParamError) -> Response:
        return page("error.html", 400, message=f"Invalid {exc.name}: {exc.problem}.")

    def read(fn: Callable[[queries.Conn], Any]) -> Any:
        with context.transaction() as conn:
            return fn(conn)

    def back(default: str = "/ops/") -> str:
        return _safe_next(request.form.get("next") or default)

    # --- login ----------------------------------------------------------------------

    @board.get("/login")
    def login_form() -> Response:
        return page("login.html", next=_safe_next(request.args.get("next")), failed=False)

    @board.post("/login")
    def login() -> Response:
        target = _safe_next(request.form.get("next"))
        if not token_matches(request.form.get("token"), token):
            log.warning("ops.login_failed")
            return page("login.html", 401, next=target, failed=True)
        response = redirect(target, 303)
        response.set_cookie(
            SESSION_COOKIE,
            session_value(token),
            max_age=SESSION_SECONDS,
            path="/ops/",
            httponly=True,
            samesite="Strict",
            secure=request.is_secure,
        )
        log.info("ops.login")
        return response

    @board.post("/logout")
    def logout() -> Response:
        response = redirect("/ops/login", 303)
        response.delete_cookie(SESSION_COOKIE, path="/ops/")
        return response

    # --- overview -------------------------------------------------------------------

    @board.get("/")
    def overview() -> Response:
        stats = pipeline_stats(context)
        midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)

        def load(conn: queries.Conn) -> dict[str, Any]:
            failed, _ = queries.events(conn, statuses=["failed", "dead"], since=midnight, limit=50)
            return {
                "minutes": queries.per_minute(conn, CHART_MINUTES),
                "flags": queries.flags(conn, status="open", limit=50),
                "dead_letters": queries.dead_letters(conn, replayed=False, limit=50),
                "failed_today": failed,
            }

        data = read(load)
        peak = max((m["total"] for m in data["minutes"]), default=0) or 1
        return page("overview.html", stats=stats, peak=peak, **data)

    # --- search and detail pages ----------------------------------------------------

    @board.get("/search")
    def search() -> Response:
        q = (request.args.get("q") or "").strip()
        if not q:
            return redirect("/ops/", 303)
        found = read(lambda conn: queries.search(conn, q))
        hits = [
            *(f"/ops/events/{e['event_id']}" for e in found["events"]),
            *(f"/ops/redemptions/{r['redemption_id']}" for r in found["redemptions"]),
            *(f"/ops/orders/{o['order_id']}" for o in found["orders"]),
            *(f"/ops/customers/{c['customer_id']}" for c in found["customers"]),
        ]
        return page("search.html", q=q, found=found, hits=hits)

    def not_found(what: str, ident: str) -> Response:
        return page("error.html", 404, message=f"No {what} {ident!r} is known.")

    @board.get("/events")
    def events() -> Response:
        args = request.args
        statuses = parse_statuses(args.getlist("status"))
        since = parse_time("since", args.get("since"))
        until = parse_time("until", args.get("until"))
        rows, cursor = read(
            lambda conn: queries.events(
                conn,
                statuses=statuses,
                event_type=args.get("type") or None,
                since=since,
                until=until,
                cursor=decode_event_cursor(args.get("cursor")),
                limit=parse_limit(args.get("limit")),
            )
        )
        next_query = {k: v for k, v in args.items(multi=True) if k != "cursor"}
        next_cursor = encode_event_cursor(cursor)
        next_url = None
        if next_cursor:
            pairs = [(k, v) for k, v in args.items(multi=True) if k != "cursor"]
            next_url = "/ops/events?" + urlencode([*pairs, ("cursor", next_cursor)])
        return page(
            "events.html",
            rows=rows,
            next_url=next_url,
            filters=next_query,
            statuses=statuses or [],
            since=since,
            until=until,
        )

    @board.get("/events/<event_id>")
    def event(event_id: str) -> Response:
        row = read(lambda conn: queries.event(conn, event_id))
        if row is None:
            return not_found("event", event_id)
        return page("event.html", event=row)

    @board.get("/redemptions/<redemption_id>")
    def redemption(redemption_id: str) -> Response:
        row = read(lambda conn: queries.redemption(conn, redemption_id))
        if row is None:
            return not_found("redemption", redemption_id)
        return page("redemption.html", r=row)

    @board.get("/orders/<order_id>")
    def order(order_id: str) -> Response:
        row = read(lambda conn: queries.order(conn, order_id))
        if row is None:
            return not_found("order", order_id)
        return page("order.html", o=row)

    @board.get("/customers/<customer_id>")
    def customer(customer_id: str) -> Response:
        row = read(lambda conn: queries.customer(conn, customer_id))
        if row is None:
            return not_found("customer", customer_id)
        return page("customer.html", c=row)

    @board.get("/flags")
    def flags() -> Response:
        args = request.args
        status = parse_choice("status", args.get("status"), FLAG_STATUSES)
        result = read(
            lambda conn: queries.flags(
                conn,
                status=status,
                failure_code=args.get("failure_code") or None,
                category=parse_choice("category", args.get("category"), FLAG_CATEGORIES),
                cursor=parse_id("cursor", args.get("cursor")),
                limit=parse_limit(args.get("limit")),
            )
        )
        pairs = [(k, v) for k, v in args.items(multi=True) if k != "cursor"]
        next_url = (
            "/ops/flags?" + urlencode([*pairs, ("cursor", result.next_cursor)])
            if result.next_cursor
            else None
        )
        return page("flags.html", flags=result.items, next_url=next_url, flag_status=status)

    @board.get("/dead-letters")
    def dead_letters() -> Response:
        args = request.args
        replayed = parse_bool("replayed", args.get("replayed"))
        result = read(
            lambda conn: queries.dead_letters(
                conn,
                event_type=args.get("type") or None,
                replayed=replayed,
                cursor=parse_id("cursor", args.get("cursor")),
                limit=parse_limit(args.get("limit")),
            )
        )
        pairs = [(k, v) for k, v in args.items(multi=True) if k != "cursor"]
        next_url = (
            "/ops/dead-letters?" + urlencode([*pairs, ("cursor", result.next_cursor)])
            if result.next_cursor
            else None
        )
        return page("dead_letters.html", letters=result.items, next_url=next_url)

    # --- actions --------------------------------------------------------------------

    @board.post("/flags/<int:flag_id>/resolve")
    def resolve_flag(flag_id: int) -> Response:
        note = (request.form.get("note") or "").strip()[:2000] or None
        flag = read(lambda conn: queries.resolve_flag(conn, flag_id, note))
        if flag is None:
            return redirect(_with_notice(back(), "not_found", f"Flag {flag_id}"), 303)
        log.info("ops.flag_resolved", extra={"flag_id": flag_id})
        return redirect(_with_notice(back(), "flag_resolved", flag_id), 303)

    def requeue(action: Callable[[], replay.ReplayStep], ident: object) -> Response:
        try:
            step = action()
        except replay.NotFound:
            return redirect(_with_notice(back(), "not_found", ident), 303)
        except replay.PayloadPruned:
            return redirect(_with_notice(back(), "payload_pruned", ident), 303)
        except replay.BrokerUnavailable as exc:
            log.error("ops.replay_failed", extra={"error": str(exc)})
            return redirect(_with_notice(back(), "broker_unavailable"), 303)
        return redirect(_with_notice(back(), "requeued", step.event_id), 303)

    @board.post("/dead-letters/<int:dead_letter_id>/replay")
    def replay_dead_letter(dead_letter_id: int) -> Response:
        return requeue(
            lambda: replay.replay_dead_letter(context, dead_letter_id),
            f"Dead letter {dead_letter_id}",
        )

    @board.post("/events/<event_id>/replay")
    def replay_event(event_id: str) -> Response:
        return requeue(lambda: replay.replay_event(context, event_id), event_id)

    @board.post("/events/replay")
    def replay_events() -> Response:
        """The "replay all shown" button of a list of failed events."""
        event_ids = request.form.getlist("event_id")[:MAX_BULK_REPLAY]
        done = 0
        for event_id in event_ids:
            try:
                replay.replay_event(context, event_id)
                done += 1
            except (replay.NotFound, replay.PayloadPruned):
                continue
            except replay.BrokerUnavailable as exc:
                log.error("ops.replay_failed", extra={"error": str(exc)})
                return redirect(_with_notice(back(), "broker_unavailable"), 303)
        return redirect(_with_notice(back(), "requeued_many", done), 303)

    return board
