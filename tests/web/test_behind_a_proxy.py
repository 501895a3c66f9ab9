"""Behind a TLS-terminating load balancer (as on Heroku or Render): the web process trusts
X-Forwarded-Proto from FORWARDED_ALLOW_IPS only, so the dashboard's session cookie is
Secure exactly when the client spoke HTTPS to the balancer; every answer of the ops tools
carries the security headers."""

from __future__ import annotations

import http.client
from pathlib import Path
from urllib.parse import urlencode

import pytest

from devtools.webhooks import SECRET
from tests.conftest import Processes, process_env

TOKEN = "proxy-test-token-0123456789abcdefghijklmnop"
DASHBOARD_HEADERS = {
    "Content-Security-Policy": "default-src 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def start_web(
    processes: Processes, database_url: str, redis_url: str, tmp_path: Path, trusted: str
) -> int:
    (tmp_path / "metrics").mkdir(exist_ok=True)
    env = process_env(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        VOUCHERIFY_WEBHOOK_SECRET=SECRET,
        OPS_API_TOKEN=TOKEN,
        FORWARDED_ALLOW_IPS=trusted,
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
    )
    return processes.web(env)[1]


def log_in(port: int, **headers: str) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(
        "POST",
        "/ops/login",
        urlencode({"token": TOKEN, "next": "/ops/"}),
        {"Content-Type": "application/x-www-form-urlencoded", **headers},
    )
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


@pytest.mark.e2e
def test_the_session_cookie_is_secure_when_the_trusted_balancer_says_https(
    processes: Processes, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    port = start_web(processes, database_url, redis_url, tmp_path, trusted="127.0.0.1")

    behind_tls = log_in(port, **{"X-Forwarded-Proto": "https"})
    assert behind_tls.status == 303, processes.logs()
    cookie = behind_tls.headers["Set-Cookie"]
    assert "Secure" in cookie
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie

    plain = log_in(port)
    assert plain.status == 303
    assert "Secure" not in plain.headers["Set-Cookie"]


@pytest.mark.e2e
def test_an_untrusted_peer_cannot_claim_https(
    processes: Processes, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    port = start_web(processes, database_url, redis_url, tmp_path, trusted="192.0.2.1")
    claimed = log_in(port, **{"X-Forwarded-Proto": "https"})
    assert "Secure" not in claimed.headers["Set-Cookie"]


@pytest.mark.e2e
def test_the_ops_pages_carry_the_security_headers(
    processes: Processes, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    port = start_web(processes, database_url, redis_url, tmp_path, trusted="127.0.0.1")
    for path in ("/ops/login", "/ops/"):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        conn.close()
        for name, expected in DASHBOARD_HEADERS.items():
            assert expected in (response.headers[name] or ""), (path, name)
        assert "script-src" not in response.headers["Content-Security-Policy"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/ops/api/stats", headers={"Authorization": f"Bearer {TOKEN}"})
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
