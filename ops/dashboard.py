"""The operators' dashboard at /ops/: server-rendered HTML, no JavaScript at all.

Same token as the API: the login form takes it once and sets a session cookie (see
``ops.auth``). Pages: the overview (events per minute by outcome, lag, queue, open flags
with a resolve button, dead letters with a replay button, what failed today), search by
event, delivery, order, redemption, voucher code or customer id, and one page per event,
redemption, order and customer. Every POST carries a CSRF field and answers with a 303
back to the page it came from.

Each view parses its query with ``ops.service``'s filters, asks the service and renders a
template; the context comes from the app (``ops.context.current()``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import psycopg
from flask import Blueprint, make_response, redirect, render_template, request
from werkzeug.wrappers import Response

from ops import service
from ops.api import no_store
from ops.auth import (
    SESSION_COOKIE,
    SESSION_SECONDS,
    csrf_valid,
    csrf_value,
    session_valid,
    session_value,
    token_matches,
)
from ops.context import current, current_token
from ops.params import MAX_NOTE_CHARS, ParamError, Query
from ops.stats import overview as read_overview
from schemas.vocabulary import ActionKind, DeliveryOutcome, FlagStatus
from workers.jobs.flag_actions import ActionRefused

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
CHART_MINUTES = 30
MAX_BULK_REPLAY = 500
PUBLIC_ENDPOINTS = frozenset({"ops_dashboard.login", "ops_dashboard.login_form"})

FINISHED_OUTCOMES = tuple(o for o in DeliveryOutcome if o is not DeliveryOutcome.RECEIVED)
"""The chart's columns; its bars show these and then the deliveries still in flight."""
CHART_OUTCOMES = (*FINISHED_OUTCOMES, DeliveryOutcome.RECEIVED)

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
    "action_succeeded": "Action {id} succeeded: the flag is resolved.",
    "action_failed": "Action {id} did not succeed: see the flag's note and actions.",
    "action_refused": "The action was not done: {id}",
}

dashboard = Blueprint("ops_dashboard", __name__, url_prefix="/ops", template_folder=str(TEMPLATES))


# --- template helpers -------------------------------------------------------------------


@dashboard.app_template_filter("ops_time")
def fmt_time(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") + "Z"


@dashboard.app_template_filter("ops_secs")
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


@dashboard.app_template_test("ops_open_flag")
def is_open_flag(flag: Mapping[str, Any]) -> bool:
    return bool(flag.get("status") == FlagStatus.OPEN)


@dashboard.app_template_global("ops_failed_today_url")
def failed_today_url() -> str:
    """The events that need attention, received today."""
    statuses = [("status", status.value) for status in service.ATTENTION_STATUSES]
    return "/ops/events?" + urlencode([*statuses, ("since", "today")])


# --- pages and redirects ----------------------------------------------------------------


def safe_next(raw: str | None) -> str:
    """Only our own pages: never an open redirect."""
    if raw and raw.startswith("/ops/") and not raw.startswith("//") and "\\" not in raw:
        return raw
    return "/ops/"


def with_notice(target: str, notice: str, ident: object = "") -> str:
    parts = urlsplit(target)
    query = "&".join(
        p for p in parts.query.split("&") if p and not p.startswith(("notice=", "id="))
    )
    extra = urlencode({"notice": notice, "id": str(ident)})
    return urlunsplit(parts._replace(query=f"{query}&{extra}" if query else extra))


def back(notice: str, ident: object = "") -> Response:
    """A 303 to the page the form came from, with a notice."""
    return redirect(with_notice(safe_next(request.form.get("next")), notice, ident), 303)


def session() -> str | None:
    value = request.cookies.get(SESSION_COOKIE)
    return value if session_valid(value, current_token()) else None


def page(template: str, status: int = 200, **values: Any) -> Response:
    valid = session()
    notice = NOTICES.get(request.args.get("notice", ""), "")
    html = render_template(
        f"ops/{template}",
        csrf=csrf_value(current_token(), valid) if valid else "",
        here=request.full_path.rstrip("?"),
        notice=notice.format(id=request.args.get("id", "")) if notice else "",
        notice_kind=request.args.get("notice", ""),
        **values,
    )
    return make_response(html, status)


def query() -> Query:
    return request.args.to_dict(flat=False)


def next_url(path: str, cursor: object) -> str | None:
    """This page's query with the next page's cursor; None on the last page."""
    if cursor is None:
        return None
    pairs = [(k, v) for k, v in request.args.items(multi=True) if k != "cursor"]
    return f"{path}?{urlencode([*pairs, ('cursor', str(cursor))])}"


# --- guard and errors -------------------------------------------------------------------


@dashboard.before_request
def authenticate() -> Response | None:
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    valid = session()
    if valid is None:
        return page("login.html", 401, next=request.full_path.rstrip("?"), failed=False)
    if request.method == "POST" and not csrf_valid(
        request.form.get("csrf"), current_token(), valid
    ):
        log.warning("ops.csrf_refused", extra={"path": request.path})
        return back("expired_form")
    return None


@dashboard.after_request
def harden(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return no_store(response)


@dashboard.errorhandler(psycopg.OperationalError)
def database_down(exc: psycopg.OperationalError) -> Response:
    log.error("ops.database_unavailable", extra={"error": type(exc).__name__})
    return page("error.html", 503, message="PostgreSQL does not answer; try again shortly.")


@dashboard.errorhandler(ParamError)
def invalid(exc: ParamError) -> Response:
    return page("error.html", 400, message=f"Invalid {exc.name}: {exc.problem}.")


@dashboard.errorhandler(service.NotFound)
def not_found(exc: service.NotFound) -> Response:
    return page("error.html", 404, message=f"No {exc.what} {exc.ident!r} is known.")


# --- login ------------------------------------------------------------------------------


@dashboard.get("/login")
def login_form() -> Response:
    return page("login.html", next=safe_next(request.args.get("next")), failed=False)


@dashboard.post("/login")
def login() -> Response:
    target = safe_next(request.form.get("next"))
    token = current_token()
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


@dashboard.post("/logout")
def logout() -> Response:
    response = redirect("/ops/login", 303)
    response.delete_cookie(SESSION_COOKIE, path="/ops/")
    return response


# --- pages ------------------------------------------------------------------------------


@dashboard.get("/")
def overview() -> Response:
    data = read_overview(current(), CHART_MINUTES)
    peak = max((m["total"] for m in data["minutes"]), default=0) or 1
    return page(
        "overview.html", peak=peak, outcomes=CHART_OUTCOMES, columns=FINISHED_OUTCOMES, **data
    )


@dashboard.get("/search")
def search() -> Response:
    q = (request.args.get("q") or "").strip()
    if not q:
        return redirect("/ops/", 303)
    found = service.search(current(), q)
    hits = [
        *(f"/ops/events/{e['event_id']}" for e in found["events"]),
        *(f"/ops/redemptions/{r['redemption_id']}" for r in found["redemptions"]),
        *(f"/ops/orders/{o['order_id']}" for o in found["orders"]),
        *(f"/ops/customers/{c['customer_id']}" for c in found["customers"]),
    ]
    return page("search.html", q=q, found=found, hits=hits)


@dashboard.get("/events")
def events() -> Response:
    wanted = service.EventFilter.parse(query())
    found = service.events(current(), wanted)
    return page(
        "events.html",
        rows=found.items,
        next_url=next_url("/ops/events", found.next_cursor),
        filters={k: v for k, v in request.args.items(multi=True) if k != "cursor"},
        statuses=wanted.statuses or [],
        since=wanted.since,
        until=wanted.until,
    )


@dashboard.get("/events/<event_id>")
def event(event_id: str) -> Response:
    return page("event.html", event=service.event(current(), event_id))


@dashboard.get("/redemptions/<redemption_id>")
def redemption(redemption_id: str) -> Response:
    return page("redemption.html", r=service.redemption(current(), redemption_id))


@dashboard.get("/orders/<order_id>")
def order(order_id: str) -> Response:
    return page("order.html", o=service.order(current(), order_id))


@dashboard.get("/customers/<customer_id>")
def customer(customer_id: str) -> Response:
    return page("customer.html", c=service.customer(current(), customer_id))


@dashboard.get("/flags")
def flags() -> Response:
    wanted = service.FlagFilter.parse(query())
    found = service.flags(current(), wanted)
    return page(
        "flags.html",
        flags=found.items,
        next_url=next_url("/ops/flags", found.next_cursor),
        flag_status=wanted.status,
        flag_statuses=tuple(FlagStatus),
    )


@dashboard.get("/flags/<int:flag_id>")
def flag(flag_id: int, preview: Mapping[str, Any] | None = None) -> Response:
    return page(
        "flag.html",
        f=service.flag(current(), flag_id),
        preview=preview,
        actions_enabled=current().settings.voucherify_api_enabled,
        action_kinds=tuple(ActionKind),
    )


@dashboard.get("/dead-letters")
def dead_letters() -> Response:
    found = service.dead_letters(current(), service.DeadLetterFilter.parse(query()))
    return page(
        "dead_letters.html",
        letters=found.items,
        next_url=next_url("/ops/dead-letters", found.next_cursor),
    )


# --- actions ----------------------------------------------------------------------------


@dashboard.post("/flags/<int:flag_id>/resolve")
def resolve_flag(flag_id: int) -> Response:
    note = (request.form.get("note") or "").strip()[:MAX_NOTE_CHARS] or None
    try:
        service.resolve_flag(current(), flag_id, note)
    except service.NotFound:
        return back("not_found", f"Flag {flag_id}")
    return back("flag_resolved", flag_id)


@dashboard.post("/flags/<int:flag_id>/actions")
def flag_action(flag_id: int) -> Response:
    """Preview (the flag's page with the preview and its confirm button) or, with
    ``confirm``, do an action; back to the flag's page with what became of it."""
    form = {
        "kind": request.form.get("kind"),
        "confirm": request.form.get("confirm") == "true",
        "by": (request.form.get("by") or "").strip() or "dashboard",
    }
    try:
        answer = service.flag_action(current(), flag_id, form, by="dashboard")
    except ActionRefused as exc:
        return back("action_refused", exc.detail)
    if not form["confirm"]:
        return flag(flag_id, preview=answer)
    notice = "action_succeeded" if answer.get("state") == "succeeded" else "action_failed"
    return back(notice, answer.get("id", ""))


def requeue(action: Callable[[], service.ReplayStep], ident: object) -> Response:
    """Run one replay and go back with a notice of what became of it."""
    try:
        step = action()
    except service.NotFound:
        return back("not_found", ident)
    except service.PayloadPruned:
        return back("payload_pruned", ident)
    except service.BrokerUnavailable as exc:
        log.error("ops.replay_failed", extra={"error": str(exc)})
        return back("broker_unavailable")
    return back("requeued", step.event_id)


@dashboard.post("/dead-letters/<int:dead_letter_id>/replay")
def replay_dead_letter(dead_letter_id: int) -> Response:
    return requeue(
        lambda: service.replay_dead_letter(current(), dead_letter_id),
        f"Dead letter {dead_letter_id}",
    )


@dashboard.post("/events/<event_id>/replay")
def replay_event(event_id: str) -> Response:
    return requeue(lambda: service.replay_event(current(), event_id), event_id)


@dashboard.post("/events/replay")
def replay_events() -> Response:
    """The "replay all shown" button of a list of failed events."""
    event_ids = request.form.getlist("event_id")[:MAX_BULK_REPLAY]
    done = 0
    try:
        for step in service.replay_events(current(), event_ids):
            if step.action is service.ReplayAction.REQUEUED:
                done += 1
    except service.BrokerUnavailable as exc:
        log.error("ops.replay_failed", extra={"error": str(exc)})
        return back("broker_unavailable")
    return back("requeued_many", done)
