"""The dashboard's HTML, login, CSRF and actions, through Flask's test client.

(The same flows in a real browser are in ``test_dashboard_browser.py``.)
"""

from __future__ import annotations

import re
from http.cookies import SimpleCookie
from typing import Any

import psycopg
import redis
from flask.testing import FlaskClient

from ops.auth import SESSION_COOKIE, SESSION_SECONDS, session_value
from tests.ops.conftest import AUTH, TOKEN, State
from workers.queue import DELIVERY_QUEUE


def log_in(client: FlaskClient) -> str:
    """Log in through the form; the page's CSRF value."""
    response = client.post("/ops/login", data={"token": TOKEN, "next": "/ops/"})
    assert response.status_code == 303
    assert response.headers["Location"] == "/ops/"
    return csrf_of(client.get("/ops/").get_data(as_text=True))


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert match, "no CSRF field on the page"
    return match.group(1)


def test_pages_need_a_login_and_a_wrong_token_is_refused(client: FlaskClient) -> None:
    response = client.get("/ops/")
    assert response.status_code == 401
    assert 'name="token"' in response.get_data(as_text=True)
    assert client.get("/ops/events/ev_1").status_code == 401
    assert client.post("/ops/flags/1/resolve").status_code == 401
    # The API's bearer header does not open the dashboard: it uses its own session.
    assert client.get("/ops/", headers=AUTH).status_code == 401

    refused = client.post("/ops/login", data={"token": "not-it", "next": "/ops/"})
    assert refused.status_code == 401
    assert "not the one configured" in refused.get_data(as_text=True)
    assert "Set-Cookie" not in refused.headers


def test_login_sets_a_strict_httponly_session_cookie(client: FlaskClient) -> None:
    response = client.post("/ops/login", data={"token": TOKEN, "next": "/ops/flags"})
    assert response.status_code == 303
    assert response.headers["Location"] == "/ops/flags"
    cookie = SimpleCookie(response.headers["Set-Cookie"])[SESSION_COOKIE]
    assert cookie["httponly"]
    assert cookie["samesite"] == "Strict"
    assert cookie["path"] == "/ops/"
    assert TOKEN not in cookie.value
    # An outside "next" is never followed.
    evil = client.post("/ops/login", data={"token": TOKEN, "next": "https://evil.test/"})
    assert evil.headers["Location"] == "/ops/"


def test_a_forged_or_expired_session_is_refused(client: FlaskClient) -> None:
    client.set_cookie(SESSION_COOKIE, "1700000000.deadbeef", path="/ops/")
    assert client.get("/ops/").status_code == 401
    old = session_value(TOKEN, now=1_000_000.0)
    client.set_cookie(SESSION_COOKIE, old, path="/ops/")
    assert client.get("/ops/").status_code == 401
    fresh = session_value(TOKEN)
    client.set_cookie(SESSION_COOKIE, fresh, path="/ops/")
    assert client.get("/ops/").status_code == 200
    assert SESSION_SECONDS <= 24 * 3600


def test_the_overview_shows_traffic_lag_flags_dead_letters_and_failures(
    client: FlaskClient, state: State
) -> None:
    log_in(client)
    response = client.get("/ops/")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert "<script" not in html
    assert "script-src" not in response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Frame-Options"] == "DENY"
    assert "Events per minute by outcome" in html
    assert "lag p95" in html
    assert 'class="o-processed"' in html  # a bar for this minute's processed deliveries
    assert html.count('action="/ops/flags/') == 3  # a resolve button per open flag
    assert html.count('/replay"') >= 1
    assert "Failed or dead today" in html
    assert state.dead_event in html


def test_resolving_a_flag_needs_the_csrf_field(
    client: FlaskClient, state: State, db: psycopg.Connection[Any]
) -> None:
    csrf = log_in(client)
    flag_id = db.execute("SELECT max(id) FROM flags").fetchone()[0]
    forged = client.post(f"/ops/flags/{flag_id}/resolve", data={"note": "x", "next": "/ops/"})
    assert forged.status_code == 303
    assert "notice=expired_form" in forged.headers["Location"]
    assert db.execute("SELECT status FROM flags WHERE id = %s", (flag_id,)).fetchone() == ("open",)

    done = client.post(
        f"/ops/flags/{flag_id}/resolve",
        data={"note": "checked", "next": "/ops/", "csrf": csrf},
    )
    assert done.status_code == 303
    assert db.execute("SELECT status, note FROM flags WHERE id = %s", (flag_id,)).fetchone() == (
        "resolved",
        "checked",
    )
    page = client.get(done.headers["Location"]).get_data(as_text=True)
    assert f"Flag {flag_id} resolved." in page
    assert page.count('action="/ops/flags/') == 2


def test_replaying_a_dead_letter_and_failed_events_from_the_dashboard(
    client: FlaskClient, state: State, db: psycopg.Connection[Any], redis_client: redis.Redis
) -> None:
    csrf = log_in(client)
    # One event dead today: the button speaks of one event.
    assert "Replay this event</button>" in client.get("/ops/").get_data(as_text=True)
    letter_id = db.execute("SELECT id FROM dead_letters").fetchone()[0]
    done = client.post(
        f"/ops/dead-letters/{letter_id}/replay", data={"csrf": csrf, "next": "/ops/"}
    )
    assert done.status_code == 303
    assert redis_client.llen(DELIVERY_QUEUE) == 1
    assert f"Event {state.dead_event} re-queued" in client.get(done.headers["Location"]).get_data(
        as_text=True
    )
    # "Replay these events" on a list of failed events.
    many = client.post(
        "/ops/events/replay",
        data={"csrf": csrf, "next": "/ops/", "event_id": [state.redeemed_event, "ev_ops_loy"]},
    )
    assert "notice=requeued_many" in many.headers["Location"]
    assert redis_client.llen(DELIVERY_QUEUE) == 3


def test_search_and_the_detail_pages(client: FlaskClient, state: State) -> None:
    log_in(client)
    html = client.get("/ops/search", query_string={"q": state.redeemed}).get_data(as_text=True)
    assert f'href="/ops/redemptions/{state.redeemed}"' in html
    redemption = client.get(f"/ops/redemptions/{state.redeemed}").get_data(as_text=True)
    assert "ROLLED_BACK" in redemption
    assert "redemption.rollback.succeeded" in redemption
    assert "-2000" in redemption
    for path in (
        f"/ops/events/{state.redeemed_event}",
        f"/ops/orders/{state.order_id}",
        f"/ops/customers/{state.customer_id}",
        "/ops/flags?status=open",
        "/ops/dead-letters?replayed=false",
        "/ops/events?status=failed,dead&since=today",
        f"/ops/redemptions/{state.flagged}",
    ):
        assert client.get(path).status_code == 200, path
    for kind in ("events", "orders", "redemptions", "customers"):
        assert client.get(f"/ops/{kind}/nope").status_code == 404
    assert client.get("/ops/events?since=whenever").status_code == 400


def test_ids_are_escaped_in_the_html(client: FlaskClient, state: State) -> None:
    log_in(client)
    html = client.get("/ops/search", query_string={"q": "<script>alert(1)</script>"}).get_data(
        as_text=True
    )
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;" in html
