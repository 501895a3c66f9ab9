"""A fake of Voucherify's REST API on loopback: ``GET /v1/redemptions/<id>`` and
``GET /v1/vouchers/<code>/transactions``.

Serves redemptions and rollbacks built from the published fixtures (the REST rollback
responses and the redemption-family payloads), checks the ``X-App-Id`` / ``X-App-Token``
headers, and can answer 429 or 5xx a given number of times first.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from devtools.webhooks import VOUCHERIFY, fixture, gift_voucher, loyalty_voucher

APP_ID = "test-app-id"
APP_TOKEN = "test-app-token"


@dataclass
class Failure:
    status: int
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeVoucherify:
    url: str = ""
    redemptions: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[str, list[Failure]] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    transactions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Card code (or id) -> its transactions, oldest first, as ``VoucherTransaction``."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail_first(self, redemption_id: str, *failures: Failure) -> None:
        with self.lock:
            self.failures.setdefault(redemption_id, []).extend(failures)

    def requested(self, redemption_id: str) -> int:
        with self.lock:
            return sum(1 for path, _ in self.requests if path.endswith("/" + redemption_id))

    def answer(self, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
        with self.lock:
            self.requests.append((path, headers))
            if headers.get("x-app-id") != APP_ID or headers.get("x-app-token") != APP_TOKEN:
                return 401, {}, {"code": 401, "key": "unauthorized", "message": "Unauthorized"}
            if path.startswith("/v1/vouchers/") and "/transactions" in path:
                return _transactions_page(self, path)
            prefix = "/v1/redemptions/"
            if not path.startswith(prefix):
                return 404, {}, {"code": 404, "key": "not_found"}
            redemption_id = path[len(prefix) :]
            pending = self.failures.get(redemption_id)
            if pending:
                failure = pending.pop(0)
                return failure.status, failure.headers, {"code": failure.status}
            found = self.redemptions.get(redemption_id)
            if found is None:
                return 404, {}, {"code": 404, "key": "not_found", "message": "Not found"}
            return 200, {}, found


def _transactions_page(fake: FakeVoucherify, path: str) -> tuple[int, dict[str, str], Any]:
    """``GET /v1/vouchers/{code}/transactions``: the published list shape (``object``,
    ``data_ref``, ``data``, ``has_more``, ``more_starting_after``), ``order=-id`` or ``id``,
    ``limit`` (10 by default), cursor ``starting_after_id``."""
    parts = urlsplit(path)
    code = unquote(parts.path.split("/")[3])
    query = dict(parse_qsl(parts.query))
    if code not in fake.transactions:
        return 404, {}, {"code": 404, "key": "not_found", "message": "Resource not found"}
    listed = list(fake.transactions[code])
    if query.get("order", "-id") == "-id":
        listed.reverse()
    after = query.get("starting_after_id")
    if after:
        ids = [t["id"] for t in listed]
        listed = listed[ids.index(after) + 1 :] if after in ids else []
    limit = int(query.get("limit", "10"))
    page, more = listed[:limit], len(listed) > limit
    return (
        200,
        {},
        {
            "object": "list",
            "data_ref": "data",
            "data": page,
            "has_more": more,
            "more_starting_after": page[-1]["id"] if more else None,
        },
    )


@contextmanager
def fake_voucherify() -> Iterator[FakeVoucherify]:
    fake = FakeVoucherify()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, extra, body = fake.answer(self.path, headers)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- API payloads built from the fixtures ---------------------------------------------


def _rest_rollback(kind: str) -> dict[str, Any]:
    name = "gift-card" if kind == "gift" else "loyalty-card"
    path = VOUCHERIFY / f"api.redemption-rollback.response.{name}.example.json"
    return dict(json.loads(path.read_text()))


def api_redemption(
    kind: str,
    redemption_id: str,
    amount: int,
    status: str = "SUCCEEDED",
    rollback_id: str | None = None,
    order_id: str = "ord_card_test",
    customer_id: str = "cust_card_test",
    date: str = "2024-02-01T08:45:32.014Z",
    rollback_date: str = "2024-02-01T10:23:52.499Z",
) -> dict[str, Any]:
    """``GET /v1/redemptions/<r_id>`` of a gift or loyalty card redemption."""
    published = fixture("redemption.succeeded")
    voucher = gift_voucher(5000) if kind == "gift" else loyalty_voucher(500)
    order = copy.deepcopy(published["order"])
    order.update(
        {
            "id": order_id,
            "customer_id": customer_id,
            "status": "CANCELED" if status == "ROLLED_BACK" else "PAID",
        }
    )
    redemption: dict[str, Any] = {
        "id": redemption_id,
        "object": "redemption",
        "date": date,
        "customer_id": customer_id,
        "tracking_id": published["redemption"].get("tracking_id"),
        "metadata": {},
        "amount": amount,
        "redemption": None,
        "result": "SUCCESS",
        "status": status,
        "related_redemptions": {
            "rollbacks": [{"id": rollback_id, "date": rollback_date}] if rollback_id else [],
            "redemptions": [],
        },
        "order": order,
        "channel": {"channel_id": "user", "channel_type": "API"},
        "customer": {"id": customer_id, "object": "customer"},
        "related_object_type": "voucher",
        "related_object_id": voucher["id"],
        "voucher": voucher,
    }
    if kind == "gift":
        redemption["gift"] = {"amount": amount}
    else:
        redemption["loyalty_card"] = {"points": amount}
    return redemption


def api_rollback(
    kind: str,
    rollback_id: str,
    redemption_id: str,
    amount: int,
    order_id: str = "ord_card_test",
    customer_id: str = "cust_card_test",
    date: str = "2024-02-01T10:23:52.499Z",
) -> dict[str, Any]:
    """``GET /v1/redemptions/<rr_id>``: the published REST rollback, re-keyed."""
    rollback = _rest_rollback(kind)
    rollback.update(
        {
            "id": rollback_id,
            "redemption": redemption_id,
            "date": date,
            "customer_id": customer_id,
            "amount": -abs(amount),
            "reason": "Customer returned the order",
        }
    )
    rollback["order"].update({"id": order_id, "customer_id": customer_id, "status": "CANCELED"})
    rollback["customer"]["id"] = customer_id
    if kind == "gift":
        rollback["gift"] = {"amount": -abs(amount)}
    else:
        rollback["loyalty_card"] = {"points": -abs(amount)}
    return rollback
