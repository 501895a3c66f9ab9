"""Behind a TLS-terminating load balancer (as on Heroku or Render): the web process trusts
X-Forwarded-Proto from FORWARDED_ALLOW_IPS only, so the dashboard's session cookie is
Secure exactly when the client spoke HTTPS to the balancer; every answer of the ops tools
carries the security headers."""

from __future__ import annotations

import http.client
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.conftest import PipelineEnv, Processes, http_call

TOKEN = "proxy-test-token-0123456789abcdefghijklmnop"
DASHBOARD_HEADERS = {
    "Content-Security-Policy": "default-src 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@pytest.fixture
def start_web(
    processes: Processes, pipeline_env: PipelineEnv, tmp_path: Path
) -> Callable[[str], int]:
    """Starts a web process that trusts X-Forwarded-* from ``trusted``; gives its port."""

    def start(trusted: str) -> int:
        (tmp_path / "metrics").mkdir(exist_ok=True)
        env = pipeline_env(
            OPS_API_TOKEN=TOKEN,
            FORWARDED_ALLOW_IPS=trusted,
            PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
        )
        return processes.web(env)[1]

    return start


def log_in(port: int, **headers: str) -> http.client.HTTPResponse:
    form = urlencode({"token": TOKEN, "next": "/ops/"})
    headers = {"Content-Type": "application/x-www-form-urlencoded", **headers}
    return http_call(port, "POST", "/ops/login", form, headers, timeout=10)[0]


@pytest.mark.e2e
def test_the_session_cookie_is_secure_when_the_trusted_balancer_says_https(
    start_web: Callable[[str], int], processes: Processes
) -> None:
    port = start_web("127.0.0.1")

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
def test_an_untrusted_peer_cannot_claim_https(start_web: Callable[[str], int]) -> None:
    port = start_web("192.0.2.1")
    claimed = log_in(port, **{"X-Forwarded-Proto": "https"})
    assert "Secure" not in claimed.headers["Set-Cookie"]


@pytest.mark.e2e
def test_the_ops_pages_carry_the_security_headers(start_web: Callable[[str], int]) -> None:
    port = start_web("127.0.0.1")
    for path in ("/ops/login", "/ops/"):
        response, _ = http_call(port, "GET", path, timeout=10)
        for name, expected in DASHBOARD_HEADERS.items():
            assert expected in (response.headers[name] or ""), (path, name)
        assert "script-src" not in response.headers["Content-Security-Policy"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response, _ = http_call(port, "GET", "/ops/api/stats", headers=auth, timeout=10)
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
