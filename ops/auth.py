"""Who may use /ops/: the holder of ``OPS_API_TOKEN``, checked in constant time.

- API: ``Authorization: Bearer <token>``.
- Dashboard: a login form takes the token once and sets an HttpOnly, SameSite=Strict
  cookie holding ``<issued-at>.<HMAC(token, issued-at)>``: the token itself never sits in
  the browser, the cookie expires after ``SESSION_SECONDS``, and changing the token logs
  everybody out. Every dashboard POST also carries a CSRF field derived from the token
  (SameSite=Strict already keeps other sites' forms from sending the cookie).
"""

from __future__ import annotations

import hashlib
import hmac
import time

SESSION_COOKIE = "vfy_ops_session"
SESSION_SECONDS = 12 * 3600


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def token_matches(given: str | None, token: str) -> bool:
    """Constant time, whatever the lengths (both sides are hashed first)."""
    if not given:
        return False
    return hmac.compare_digest(_digest(given), _digest(token))


def bearer_matches(authorization: str | None, token: str) -> bool:
    if not authorization:
        return False
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return token_matches(given.strip(), token)


def _mac(token: str, purpose: str, message: str) -> str:
    return hmac.new(token.encode(), f"{purpose}:{message}".encode(), hashlib.sha256).hexdigest()


def session_value(token: str, now: float | None = None) -> str:
    issued = str(int(now if now is not None else time.time()))
    return f"{issued}.{_mac(token, 'session', issued)}"


def session_valid(value: str | None, token: str, now: float | None = None) -> bool:
    if not value:
        return False
    issued, _, mac = value.partition(".")
    if not issued.isdigit():
        return False
    if not hmac.compare_digest(mac.encode(), _mac(token, "session", issued).encode()):
        return False
    age = (now if now is not None else time.time()) - int(issued)
    return 0 <= age < SESSION_SECONDS


def csrf_value(token: str, session: str) -> str:
    """Bound to the session: a form from an expired session is refused."""
    return _mac(token, "csrf", session)


def csrf_valid(given: str | None, token: str, session: str | None) -> bool:
    if not given or not session:
        return False
    return hmac.compare_digest(given.encode(), csrf_value(token, session).encode())
