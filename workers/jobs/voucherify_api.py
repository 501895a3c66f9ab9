"""Call Voucherify's REST API within a budget: one request path, endpoint methods on top.

Every request, a GET (``get``) or a write (``post``), goes through ``_request``: the
``X-App-Id`` / ``X-App-Token`` headers, the budget, Voucherify's rate-limit headers and the
retries are handled there once, so an endpoint method is a path and its query. The budget
(``Budget``) is shared by every job and process through PostgreSQL: calls per UTC day and
one pace of calls, with ``SWEEP_SHARE`` of each day kept for verify's window sweep, since
going over the plan blocks the project's API, the shop's checkout included. A call the
budget refuses is not made (``BudgetExhausted``: the job stops and leaves the rest to its
next run); a write is resent only when it cannot have been processed, else
``OutcomeUnknown``: look the outcome up before sending it again. The figures, the retry
rules and why urllib3 rather than the ``voucherify`` package: docs/reconciliation.md,
"The budget" and "Errors".
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlencode

import psycopg
import urllib3
from psycopg_pool import ConnectionPool

from workers.jobs import metrics

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5
MAX_RETRY_AFTER_SECONDS = 60.0
PAGE_LIMIT = 100
"""``limit`` of a list call: Voucherify's maximum."""
MAX_PAGE = 99
"""``page`` of a list call: Voucherify answers pages 1 to 99 only."""
REMOTE_RESERVE = 1 / 3
"""Share of Voucherify's per-period limit our calls leave to the shop, whoever used the rest."""
PERIOD_SECONDS = 60.0
"""How long to pause without an ``X-Rate-Limit-Retry``: the Business plan counts per minute."""

# period: 'day', 'minute' (for the record), or 'day_others' (the calls of the day made by
# callers that leave the sweep its share); unit: what the period's buckets are.
TAKE_CALL = """
INSERT INTO voucherify_api_calls (period, starts_at, calls)
VALUES (%(period)s, date_trunc(%(unit)s, now(), 'UTC'), 1)
ON CONFLICT (period, starts_at) DO UPDATE SET calls = voucherify_api_calls.calls + 1
WHERE voucherify_api_calls.calls < %(cap)s
RETURNING calls
"""
FORGET_CALLS = "DELETE FROM voucherify_api_calls WHERE starts_at < now() - interval '2 days'"
CALLS_TODAY = """
SELECT COALESCE(sum(calls), 0) FROM voucherify_api_calls
WHERE period = 'day' AND starts_at = date_trunc('day', now(), 'UTC')
"""
PACE = "calls"
SEED_PACE = """
INSERT INTO voucherify_api_pace (name, next_slot) VALUES (%(name)s, 0)
ON CONFLICT (name) DO NOTHING
"""
LOCK_PACE = """
SELECT next_slot, paused_until FROM voucherify_api_pace WHERE name = %(name)s FOR UPDATE
"""
MOVE_PACE = "UPDATE voucherify_api_pace SET next_slot = %(next_slot)s WHERE name = %(name)s"
PAUSE = """
INSERT INTO voucherify_api_pace (name, next_slot, paused_until) VALUES (%(name)s, 0, %(until)s)
ON CONFLICT (name) DO UPDATE
SET paused_until = GREATEST(COALESCE(voucherify_api_pace.paused_until, 0), EXCLUDED.paused_until)
"""
NO_CAP = 2**31 - 1
SWEEP_SHARE = 0.7
"""The share of each day's calls kept for verify's window sweep (what finds lost webhooks):
the flags' checks and the drift job's healing never spend it, so the sweep reaches the end
of every day (``VoucherifyApi.leaving``)."""


@dataclass(frozen=True, slots=True)
class Grant:
    """A call counted and its slot taken (``refused`` None: make it after ``wait``
    seconds), or not (``refused`` says which budget: ``day``, ``minute`` (no slot within
    the time the caller has), ``rate_limit_headers`` (Voucherify's pause lasts longer))."""

    refused: str | None
    wait: float = 0.0


class VoucherifyApiError(Exception):
    """Voucherify did not give an answer we can use (after the retries, if any)."""

    def __init__(self, message: str, status: int | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.key = key
        """Voucherify's ``key`` of the error (e.g. ``already_rolled_back``), when it said."""

    @property
    def permanent(self) -> bool:
        """Credentials or URL are wrong: no other request of this run can succeed."""
        return self.status in (401, 403)


class BudgetExhausted(VoucherifyApiError):
    """The call was not made: our budget or Voucherify's headers say wait. Stop the run."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"Voucherify API budget: {reason}")
        self.reason = reason


class OutcomeUnknown(VoucherifyApiError):
    """A write may have reached Voucherify (a timeout, a connection dropped after sending, a
    5xx): it was not retried. Look the outcome up before sending it again."""


class Budget:
    """Calls per UTC day and their pace, shared by every process through PostgreSQL.

    ``take`` counts a call and gives it the next free slot: slots are ``60 / per_minute``
    seconds apart for every process together (so any 60 s holds at most the per-minute
    cap: a sliding window), and none is before the pause Voucherify's headers asked for
    (``pause``). A caller with a ``reserve`` (the flags, the drift job) makes at most
    ``per_day - reserve`` calls a day among them: the rest is the window sweep's.
    """

    def __init__(self, pool: ConnectionPool, per_minute: int, per_day: int) -> None:
        self.pool = pool
        self.per_minute = per_minute
        self.per_day = per_day
        self.interval = 60.0 / per_minute
        with pool.connection() as conn:
            conn.execute(FORGET_CALLS)
            conn.execute(SEED_PACE, {"name": PACE})

    def take(self, now: float, max_wait: float = 0.0, reserve: int = 0) -> Grant:
        """Count one call at wall-clock ``now`` if its slot is within ``max_wait`` seconds
        and the day has room beyond ``reserve``; nothing is counted when refused."""
        with self.pool.connection() as conn:
            grant = Grant(None)
            with conn.transaction():
                conn.execute(SEED_PACE, {"name": PACE})  # the row may have been deleted
                row = conn.execute(LOCK_PACE, {"name": PACE}).fetchone()
                next_slot, paused_until = row if row else (0.0, None)
                slot = max(now, next_slot, paused_until or 0.0)
                if slot - now > max_wait:
                    paused = paused_until is not None and paused_until > max(now, next_slot)
                    grant = Grant("rate_limit_headers" if paused else "minute")
                    raise psycopg.Rollback()
                caps = [("day", "day", self.per_day)]
                if reserve:  # and, of those, the calls that leave the sweep its share
                    caps.append(("day_others", "day", max(0, self.per_day - reserve)))
                for period, unit, cap in caps:
                    taken = {"period": period, "unit": unit, "cap": cap}
                    if conn.execute(TAKE_CALL, taken).fetchone() is None:
                        grant = Grant("day")
                        raise psycopg.Rollback()  # nothing is counted
                minute = {"period": "minute", "unit": "minute", "cap": NO_CAP}
                conn.execute(TAKE_CALL, minute)  # for the record
                conn.execute(MOVE_PACE, {"name": PACE, "next_slot": slot + self.interval})
                grant = Grant(None, slot - now)
            return grant

    def pause(self, until: float) -> None:
        """No call of any process before ``until`` (Unix time)."""
        with self.pool.connection() as conn:
            conn.execute(PAUSE, {"name": PACE, "until": until})

    def used_today(self) -> int:
        with self.pool.connection() as conn:
            row = conn.execute(CALLS_TODAY).fetchone()
            return int(row[0]) if row else 0


class VoucherifyApi:
    def __init__(
        self,
        url: str,
        app_id: str,
        app_token: str,
        budget: Budget,
        max_attempts: int = MAX_ATTEMPTS,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        timeout: tuple[float, float] = (3.0, 10.0),
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        max_wait: float | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.headers = {
            "X-App-Id": app_id,
            "X-App-Token": app_token,
            "Accept": "application/json",
        }
        self.budget = budget
        self._http = urllib3.PoolManager(
            retries=False,  # our loop retries, within the budget
            timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]),
        )
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.sleep = sleep
        self.clock = clock
        self.wall_clock = wall_clock
        self.calls = 0
        """Requests sent by this client (answered or not)."""
        self.skipped = 0
        """Calls refused for budget (each one stops its job's run)."""
        self.max_wait = max_wait
        """The longest a call waits for its slot of the budget (None: until its deadline);
        a person's action never waits longer than a few seconds."""
        self.reserve = 0
        """Calls of the day this client leaves to others (``Budget.take``): the window
        sweep's share, set while the flags and the drift job call."""

    @contextmanager
    def leaving(self, reserve: int) -> Iterator[None]:
        """Calls made within leave ``reserve`` calls of the day to others."""
        previous, self.reserve = self.reserve, reserve
        try:
            yield
        finally:
            self.reserve = previous

    # --- endpoints ------------------------------------------------------------------

    def get_redemption(self, redemption_id: str, deadline: float) -> dict[str, Any] | None:
        """The redemption (or rollback) object; None when Voucherify does not know the id."""
        return self.get(f"/v1/redemptions/{quote(redemption_id, safe='')}", (), deadline)

    def list_redemptions(
        self,
        after: datetime,
        before: datetime,
        page: int,
        deadline: float,
        limit: int = PAGE_LIMIT,
    ) -> list[dict[str, Any]]:
        """One page of redemptions and rollbacks created between the dates, oldest first."""
        query = [
            ("limit", str(limit)),
            ("page", str(page)),
            ("order", "created_at"),
            ("created_at[after]", _iso(after)),
            ("created_at[before]", _iso(before)),
        ]
        answer = self.get("/v1/redemptions", query, deadline) or {}
        items = answer.get("redemptions")
        if not isinstance(items, list):
            raise VoucherifyApiError("GET /v1/redemptions: no 'redemptions' list in the answer")
        return [item for item in items if isinstance(item, dict)]

    def get_voucher(self, code_or_id: str, deadline: float) -> dict[str, Any] | None:
        """The voucher object, ``GET /v1/vouchers/{code}`` (its code or Voucherify's id):
        ``holder_id``, ``gift.balance`` / ``loyalty_card.balance`` as of now; None when
        Voucherify does not know it. For the drift job's holder lookups
        (``workers.jobs.card_lookup``)."""
        return self.get(f"/v1/vouchers/{quote(code_or_id, safe='')}", (), deadline)

    def list_voucher_transactions(
        self, code: str, deadline: float, starting_after_id: str | None = None
    ) -> dict[str, Any]:
        """One page (100, newest first) of a card's transactions,
        ``GET /v1/vouchers/{code}/transactions``: the list object (``data``, ``has_more``,
        ``more_starting_after``, the cursor of the next page). For the drift job's healing
        (the ledger's method, written here on the one GET path)."""
        query = [("limit", "100"), ("order", "-id")]
        if starting_after_id:
            query.append(("starting_after_id", starting_after_id))
        path = f"/v1/vouchers/{quote(code, safe='')}/transactions"
        answer = self.get(path, query, deadline)
        if answer is None:
            raise VoucherifyApiError(f"GET {path}: HTTP 404", 404)
        return answer

    # --- writes (not idempotent: never resent once they may have reached Voucherify) ------

    def rollback_redemption(
        self,
        redemption_id: str,
        reason: str,
        tracking_id: str | None,
        deadline: float,
        max_wait: float | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/redemptions/{id}/rollback``: the ``redemption_rollback`` object."""
        path = f"/v1/redemptions/{quote(redemption_id, safe='')}/rollback"
        return self.post(path, _rollback_query(reason, tracking_id), {}, deadline, max_wait)

    def rollback_stack(
        self,
        parent_id: str,
        reason: str,
        tracking_id: str | None,
        deadline: float,
        max_wait: float | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/redemptions/{parentRedemptionId}/rollbacks``: ``rollbacks``,
        ``parent_rollback``, ``order``."""
        path = f"/v1/redemptions/{quote(parent_id, safe='')}/rollbacks"
        return self.post(path, _rollback_query(reason, tracking_id), {}, deadline, max_wait)

    def add_balance(
        self,
        code: str,
        amount: int,
        reason: str,
        source_id: str,
        deadline: float,
        max_wait: float | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/vouchers/{code}/balance``: the ``balance`` object."""
        body = {"amount": amount, "reason": reason, "source_id": source_id}
        path = f"/v1/vouchers/{quote(code, safe='')}/balance"
        return self.post(path, (), body, deadline, max_wait)

    # --- the one request path -------------------------------------------------------

    def get(
        self, path: str, query: Sequence[tuple[str, str]], deadline: float
    ) -> dict[str, Any] | None:
        """GET ``path`` with ``query``: the JSON object, or None for 404 (unknown id)."""
        return self._request("GET", path, query, None, deadline, None)

    def post(
        self,
        path: str,
        query: Sequence[tuple[str, str]],
        body: dict[str, Any],
        deadline: float,
        max_wait: float | None = None,
    ) -> dict[str, Any]:
        """POST ``body`` (JSON) to ``path``: the JSON object. Retried only when it cannot
        have been processed (refused connection, 429); else ``OutcomeUnknown``.
        ``max_wait=0``: the budget's slot now or ``BudgetExhausted`` at once (a person
        waiting is never queued)."""
        answer = self._request("POST", path, query, body, deadline, max_wait)
        if answer is None:  # pragma: no cover - _request raises for a POST's 404
            raise VoucherifyApiError(f"POST {path}: HTTP 404", 404)
        return answer

    def _request(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]],
        payload: dict[str, Any] | None,
        deadline: float,
        max_wait: float | None,
    ) -> dict[str, Any] | None:
        target = self.url + path + ("?" + urlencode(query, safe="[]:") if query else "")
        write = method != "GET"
        headers_out = dict(self.headers)
        data: bytes | None = None
        if payload is not None:
            data = json.dumps(payload).encode()
            headers_out["Content-Type"] = "application/json"
        attempt = 0
        while True:
            attempt += 1
            self._take_budget(deadline, max_wait)
            status: int | None = None
            headers: dict[str, str] = {}
            body = b""
            unsent = False
            self.calls += 1
            try:
                response = self._http.request(method, target, body=data, headers=headers_out)
                status, body = response.status, response.data
                headers = {k.lower(): v for k, v in response.headers.items()}
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                # Never connected (refused, connect timeout, name): nothing was sent.
                unsent = isinstance(exc, urllib3.exceptions.ConnectTimeoutError)
            else:
                error = f"HTTP {status}"
            metrics.VOUCHERIFY_API_REQUESTS.labels(str(status or "error")).inc()
            self._read_limits(headers)
            if status is not None and 200 <= status < 300:
                return _json_object(body, path, method)
            if status == 404 and not write:
                return None
            if status is not None and not _retryable(status):
                key, detail = _error_of(body)
                raise VoucherifyApiError(f"{method} {path}: {error}: {detail}", status, key)
            if write and status != 429 and not unsent:
                raise OutcomeUnknown(f"{method} {path}: {error}: not resent", status)
            delay = self._delay(attempt, headers)
            if attempt >= self.max_attempts or self.clock() + delay > deadline:
                raise VoucherifyApiError(
                    f"{method} {path}: {error} after {attempt} attempts", status
                )
            log.warning(
                "voucherify_api.retry",
                extra={"path": path, "error": error, "delay": round(delay, 3)},
            )
            self.sleep(delay)

    def _take_budget(self, deadline: float, max_wait: float | None = None) -> None:
        """Wait for this call's slot (the shared pace, Voucherify's pause) if the run has
        the time (at most ``max_wait`` when given); else the call is skipped
        (``BudgetExhausted``)."""
        wait = max(0.0, deadline - self.clock())
        max_wait = max_wait if max_wait is not None else self.max_wait
        if max_wait is not None:
            wait = min(wait, max(0.0, max_wait))
        grant = self.budget.take(self.wall_clock(), wait, reserve=self.reserve)
        if grant.refused is not None:
            self._skip(grant.refused)
        if grant.wait > 0:
            self.sleep(grant.wait)

    def _skip(self, reason: str) -> None:
        self.skipped += 1
        metrics.VOUCHERIFY_API_SKIPPED.labels(reason).inc()
        log.warning("voucherify_api.budget_exhausted", extra={"reason": reason})
        raise BudgetExhausted(reason)

    def _read_limits(self, headers: dict[str, str]) -> None:
        """Pause when the project's remaining calls in the period fall to the shop's reserve."""
        limit = _number(headers.get("x-rate-limit-limit"))
        remaining = _number(headers.get("x-rate-limit-remaining"))
        if limit is None or remaining is None or remaining > limit * REMOTE_RESERVE:
            return
        until = _epoch(headers.get("x-rate-limit-retry"))
        until = until if until is not None else self.wall_clock() + PERIOD_SECONDS
        self.budget.pause(until)
        log.warning(
            "voucherify_api.paused",
            extra={"remaining": remaining, "limit": limit, "until": until},
        )

    def _delay(self, attempt: int, headers: dict[str, str]) -> float:
        retry_after = _retry_after(headers.get("retry-after"), self.wall_clock())
        if retry_after is None:
            retry = _epoch(headers.get("x-rate-limit-retry"))
            retry_after = max(0.0, retry - self.wall_clock()) if retry is not None else None
        if retry_after is not None:
            return min(retry_after, MAX_RETRY_AFTER_SECONDS)
        ceiling = min(self.backoff_cap, self.backoff_base * 2.0 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not crypto


def _iso(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds, as Voucherify writes its dates."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _retryable(status: int) -> bool:
    """Rate limited (429), timed out (408) or a server error: worth another try."""
    return status in (408, 429) or status >= 500


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _epoch(value: str | None) -> float | None:
    """``X-Rate-Limit-Retry``: a Unix time, in seconds or in milliseconds."""
    number = _number(value)
    if number is None:
        return None
    return number / 1000.0 if number > 1e11 else number


def _retry_after(value: str | None, now: float) -> float | None:
    """``Retry-After`` in seconds, or as an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def _json_object(body: bytes, path: str, method: str = "GET") -> dict[str, Any]:
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise VoucherifyApiError(f"{method} {path}: not JSON") from exc
    if not isinstance(document, dict):
        raise VoucherifyApiError(f"{method} {path}: not a JSON object")
    return document


def _error_of(body: bytes) -> tuple[str | None, str]:
    """Voucherify's error object (``code``, ``key``, ``message``, ``details``): its key and
    a line for the log; the raw start of the body when it is not one."""
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        return None, repr(body[:300])
    key = document.get("key")
    parts = [str(document.get(name)) for name in ("code", "key", "message", "details")]
    return (key if isinstance(key, str) else None), " / ".join(parts)[:300]


def _rollback_query(reason: str, tracking_id: str | None) -> list[tuple[str, str]]:
    query = [("reason", reason)]
    if tracking_id:
        query.append(("tracking_id", tracking_id))
    return query


def sweep_reserve(api: VoucherifyApi) -> int:
    """The calls of the day the window sweep keeps (``SWEEP_SHARE``)."""
    return int(api.budget.per_day * SWEEP_SHARE)
