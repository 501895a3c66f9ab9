"""Read redemptions from Voucherify's REST API with the official ``voucherify`` package.

The package (OpenAPI-generated, v6) gives the host, the ``X-App-Id`` / ``X-App-Token``
headers and the transport. We call ``get_redemption_without_preload_content`` and read the
JSON ourselves instead of taking its pydantic model: the job feeds the API's answer to
the same marshmallow schemas the webhooks go through (``schemas.redemption``), which
accept both spellings of a rolled-back status and ignore fields they do not know, where
the generated model rejects any value outside the enum of its spec version.

Around each request: a rate limit (``VOUCHERIFY_API_RATE`` requests per second, for the
whole job) and retries with exponential backoff and jitter on 429 and 5xx answers and on
connection errors, honouring ``Retry-After``, bounded by an attempt count and by the
job's deadline. The package itself is imported when the first client is built: it takes
seconds to import, and only the verify job needs it.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any

from workers.jobs import metrics

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5
MAX_RETRY_AFTER_SECONDS = 60.0


class VoucherifyApiError(Exception):
    """Voucherify did not give an answer we can use (after the retries, if any)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def permanent(self) -> bool:
        """Credentials or URL are wrong: no other request of this run can succeed."""
        return self.status in (401, 403)


class RateLimiter:
    """At most ``rate`` calls per second: each call waits for its slot."""

    def __init__(
        self,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.interval = 1.0 / rate
        self.clock = clock
        self.sleep = sleep
        self._next = clock()

    def wait(self) -> None:
        now = self.clock()
        if self._next > now:
            self.sleep(self._next - now)
            now = self._next
        self._next = now + self.interval


class VoucherifyApi:
    def __init__(
        self,
        url: str,
        app_id: str,
        app_token: str,
        rate: float,
        max_attempts: int = MAX_ATTEMPTS,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        timeout: tuple[float, float] = (3.0, 10.0),
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        import voucherify  # slow import (1,400 generated models): only when verifying

        configuration = voucherify.Configuration(
            host=url.rstrip("/"),
            api_key={"X-App-Id": app_id, "X-App-Token": app_token},
            retries=0,  # our loop retries, with the budget and the rate limit
        )
        self._api = voucherify.RedemptionsApi(voucherify.ApiClient(configuration))
        self._limiter = RateLimiter(rate, clock=clock, sleep=sleep)
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.timeout = timeout
        self.sleep = sleep
        self.clock = clock

    def get_redemption(self, redemption_id: str, deadline: float) -> dict[str, Any] | None:
        """The redemption (or rollback) object; None when Voucherify does not know the id."""
        import urllib3

        attempt = 0
        while True:
            attempt += 1
            self._limiter.wait()
            status, headers, body = None, {}, b""
            try:
                response = self._api.get_redemption_without_preload_content(
                    redemption_id, _request_timeout=self.timeout
                )
                try:
                    status, headers, body = response.status, dict(response.headers), response.data
                finally:
                    response.release_conn()
            except urllib3.exceptions.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            else:
                error = f"HTTP {status}"
            metrics.VOUCHERIFY_API_REQUESTS.labels(str(status or "error")).inc()
            if status is not None and 200 <= status < 300:
                return _json_object(body, redemption_id)
            if status == 404:
                return None
            if status is not None and not _retryable(status):
                raise VoucherifyApiError(
                    f"GET /v1/redemptions/{redemption_id}: {error}: {body[:300]!r}", status
                )
            delay = self._delay(attempt, headers)
            if attempt >= self.max_attempts or self.clock() + delay > deadline:
                raise VoucherifyApiError(
                    f"GET /v1/redemptions/{redemption_id}: {error} after {attempt} attempts",
                    status,
                )
            log.warning(
                "voucherify_api.retry",
                extra={"redemption_id": redemption_id, "error": error, "delay": round(delay, 3)},
            )
            self.sleep(delay)

    def list_voucher_transactions(
        self, code: str, deadline: float, starting_after_id: str | None = None
    ) -> dict[str, Any]:
        """One page (100, newest first) of a card's transactions,
        ``GET /v1/vouchers/{code}/transactions``: the list object (``data``, ``has_more``,
        ``more_starting_after``, the cursor of the next page). For the drift job's healing;
        the same rate limit, retries and errors as ``get_redemption``."""
        import urllib3
        import voucherify
        from voucherify.models.parameter_order_list_transactions import (
            ParameterOrderListTransactions,
        )

        vouchers = voucherify.VouchersApi(self._api.api_client)
        what = f"GET /v1/vouchers/{code}/transactions"
        attempt = 0
        while True:
            attempt += 1
            self._limiter.wait()
            status, headers, body = None, {}, b""
            try:
                response = vouchers.list_voucher_transactions_without_preload_content(
                    code,
                    limit=100,
                    order=ParameterOrderListTransactions.MINUS_ID,
                    starting_after_id=starting_after_id,
                    _request_timeout=self.timeout,
                )
                try:
                    status, headers, body = response.status, dict(response.headers), response.data
                finally:
                    response.release_conn()
            except urllib3.exceptions.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            else:
                error = f"HTTP {status}"
            metrics.VOUCHERIFY_API_REQUESTS.labels(str(status or "error")).inc()
            if status is not None and 200 <= status < 300:
                return _json_object(body, code)
            if status is not None and not _retryable(status):
                raise VoucherifyApiError(f"{what}: {error}: {body[:300]!r}", status)
            delay = self._delay(attempt, headers)
            if attempt >= self.max_attempts or self.clock() + delay > deadline:
                raise VoucherifyApiError(f"{what}: {error} after {attempt} attempts", status)
            log.warning(
                "voucherify_api.retry",
                extra={"voucher_code": code, "error": error, "delay": round(delay, 3)},
            )
            self.sleep(delay)

    def _delay(self, attempt: int, headers: dict[str, str]) -> float:
        retry_after = _retry_after({k.lower(): v for k, v in headers.items()}.get("retry-after"))
        if retry_after is not None:
            return min(retry_after, MAX_RETRY_AFTER_SECONDS)
        ceiling = min(self.backoff_cap, self.backoff_base * 2.0 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not crypto


def _retryable(status: int) -> bool:
    """Rate limited (429), timed out (408) or a server error: worth another try."""
    return status in (408, 429) or status >= 500


def _retry_after(value: str | None) -> float | None:
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
    return max(0.0, when.timestamp() - time.time())


def _json_object(body: bytes, redemption_id: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise VoucherifyApiError(f"GET /v1/redemptions/{redemption_id}: not JSON") from exc
    if not isinstance(document, dict):
        raise VoucherifyApiError(f"GET /v1/redemptions/{redemption_id}: not a JSON object")
    return document
