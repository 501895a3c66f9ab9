"""A fake of Voucherify's REST API on loopback, answering in the published examples' shapes.

``GET /v1/redemptions/<id>`` and ``GET /v1/redemptions`` (``limit`` up to 100, ``page``
1 to 99 -- a page past 99 is a 400 like the real API's --, ``order=created_at``,
``created_at[after]`` / ``created_at[before]``; the answer ``{object: "list", data_ref,
redemptions, total}``), ``GET /v1/vouchers/<code or id>`` (the published voucher object,
``api_voucher``; 404 when unknown) and ``GET /v1/vouchers/<code>/transactions``.
Redemptions, rollbacks and vouchers are built from the published examples copied into
``tests/fixtures/voucherify/`` (``api.redemption.get.*``, the REST rollback responses,
``api.voucher.get.*``): no ``voucher.type`` -- the card's kind is in the top-level ``gift`` /
``loyalty_card`` object, as in the real answers. It checks the ``X-App-Id`` /
``X-App-Token`` headers, can answer 429 / 5xx with headers or drop the connection a
given number of times first, and can add ``X-Rate-Limit-*`` headers to every answer.

Writes (``do_POST``, recorded in ``posts``): ``POST /v1/redemptions/<id>/rollback`` and
``/v1/redemptions/<parent>/rollbacks`` (the redemption ``ROLLED_BACK``, a listed
``redemption_rollback``; a second one 400 ``already_rolled_back``; ids in
``rollback_window_closed`` 400 ``ROLLBACK_WINDOW_KEY``, not a published key) and
``POST /v1/vouchers/<code>/balance`` (a ``CREDITS_ADDITION`` / ``POINTS_ADDITION``
transaction, the published balance answer); ``timeout_after_effect`` drops the answer.
"""

from __future__ import annotations

import bisect
import copy
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, parse_qsl, unquote, urlsplit

from devtools.webhooks import VOUCHERIFY

APP_ID = "test-app-id"
APP_TOKEN = "test-app-token"  # noqa: S105 - the fake's own, never a real token
LIST = "list"
"""``fail_first`` key of the listing (``GET /v1/redemptions``)."""
DROP = -1
"""``Failure.status`` that closes the connection without an answer."""


@dataclass
class Failure:
    status: int
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeVoucherify:
    url: str = ""
    redemptions: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Redemptions and rollbacks by id; the listing shows them all, by ``date``."""
    failures: dict[str, list[Failure]] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    transactions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Card code (or id) -> its transactions, oldest first, as ``VoucherTransaction``."""
    vouchers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Card code (or id) -> its voucher object (``api_voucher``), for ``GET /v1/vouchers/<code>``;
    found by the object's ``id`` or ``code`` too, whatever its key."""
    rate_headers: dict[str, str] = field(default_factory=dict)
    """Added to every answer (``X-Rate-Limit-Limit`` / ``-Remaining`` / ``-Retry``)."""
    max_page: int = 99
    posts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    """Each POST's target (path and query) and JSON body, in order."""
    timeout_after_effect: set[str] = field(default_factory=set)
    """POST paths (e.g. ``/v1/redemptions/r_1/rollback``) whose effect is applied and whose
    connection is then dropped without an answer (``DROP``): an outcome unknown."""
    held_after_effect: dict[str, threading.Event] = field(default_factory=dict)
    """POST paths whose effect is applied and whose answer then waits for the event (a
    test kills the caller meanwhile: a crash between the call and its record)."""
    rollback_window_closed: set[str] = field(default_factory=set)
    """Redemption ids whose rollback is refused, 400 ``ROLLBACK_WINDOW_KEY``."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    _by_date: list[tuple[str, str]] | None = None  # (date, id), sorted; None: to rebuild

    def add(self, *objects: dict[str, Any]) -> None:
        with self.lock:
            for obj in objects:
                self.redemptions[obj["id"]] = obj
            self._by_date = None

    def fail_first(self, key: str, *failures: Failure) -> None:
        """The next requests of ``key`` (a redemption's id, a voucher's code or id as requested,
        or ``LIST``) fail this way, in turn."""
        with self.lock:
            self.failures.setdefault(key, []).extend(failures)

    def requested(self, redemption_id: str) -> int:
        with self.lock:
            return sum(1 for path, _ in self.requests if path.endswith("/" + redemption_id))

    def list_requests(self) -> list[dict[str, str]]:
        """The query of each listing request, in order."""
        with self.lock:
            paths = [p for p, _ in self.requests if urlsplit(p).path == "/v1/redemptions"]
        return [{k: v[0] for k, v in parse_qs(urlsplit(p).query).items()} for p in paths]

    def answer(self, target: str, headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
        with self.lock:
            self.requests.append((target, headers))
            if headers.get("x-app-id") != APP_ID or headers.get("x-app-token") != APP_TOKEN:
                return 401, {}, {"code": 401, "key": "unauthorized", "message": "Unauthorized"}
            split = urlsplit(target)
            if split.path.startswith("/v1/vouchers/") and "/transactions" in split.path:
                return _transactions_page(self, target)
            prefix = "/v1/redemptions/"
            voucher = _voucher_key(split.path)
            if split.path == "/v1/redemptions":
                key = LIST
            elif split.path.startswith(prefix):
                key = split.path[len(prefix) :]
            elif voucher is not None:
                key = voucher
            else:
                return 404, {}, {"code": 404, "key": "not_found"}
            pending = self.failures.get(key)
            if pending:
                failure = pending.pop(0)
                return failure.status, failure.headers, {"code": failure.status}
            if key == LIST:
                return self._list({k: v[0] for k, v in parse_qs(split.query).items()})
            found = self._voucher(voucher) if voucher is not None else self.redemptions.get(key)
            if found is None:
                return 404, {}, {"code": 404, "key": "not_found", "message": "Not found"}
            return 200, {}, found

    def answer_post(
        self, target: str, headers: dict[str, str], body: dict[str, Any]
    ) -> tuple[int, dict[str, str], Any]:
        """``POST /v1/redemptions/{id}/rollback``, ``/v1/redemptions/{parent}/rollbacks``,
        ``/v1/vouchers/{code}/balance``; ``fail_first`` keyed by the path."""
        with self.lock:
            self.requests.append((target, headers))
            self.posts.append((target, body))
            if headers.get("x-app-id") != APP_ID or headers.get("x-app-token") != APP_TOKEN:
                return 401, {}, _error(401, "unauthorized", "Unauthorized")
            split = urlsplit(target)
            pending = self.failures.get(split.path)
            if pending:
                failure = pending.pop(0)
                return failure.status, failure.headers, {"code": failure.status}
            query = dict(parse_qsl(split.query))
            parts = [unquote(part) for part in split.path.split("/")]
            if len(parts) == 5 and parts[:3] == ["", "v1", "redemptions"]:
                if parts[4] == "rollback":
                    answer = self._rollback(parts[3], query)
                elif parts[4] == "rollbacks":
                    answer = self._rollback_stack(parts[3], query)
                else:
                    answer = 404, {}, _error(404, "not_found", "Resource not found")
            elif len(parts) == 5 and parts[:3] == ["", "v1", "vouchers"] and parts[4] == "balance":
                answer = self._balance(parts[3], body)
            else:
                answer = 404, {}, _error(404, "not_found", "Resource not found")
            if answer[0] == 200 and split.path in self.timeout_after_effect:
                return DROP, {}, None
            return answer

    def _refusal(self, redemption_id: str) -> tuple[int, dict[str, str], Any] | None:
        redemption = self.redemptions.get(redemption_id)
        if redemption is None:
            return 404, {}, _error(404, "not_found", "Resource not found", redemption_id)
        if redemption.get("status") == "ROLLED_BACK":
            message = "Redemption has been already rolled back"
            return 400, {}, _error(400, "already_rolled_back", message, redemption_id)
        if redemption_id in self.rollback_window_closed:
            message = "Redemption can no longer be rolled back"
            return 400, {}, _error(400, ROLLBACK_WINDOW_KEY, message, redemption_id)
        return None

    def _roll_back(
        self, redemption_id: str, query: dict[str, str], parent: str | None = None
    ) -> dict[str, Any]:
        """The effect: a ``redemption_rollback``, listed; the redemption ``ROLLED_BACK``."""
        redemption = self.redemptions[redemption_id]
        kind = "gift" if redemption.get("gift") else "loyalty"
        moved = redemption.get("gift") or redemption.get("loyalty_card") or {}
        amount = int(moved.get("amount") or moved.get("points") or redemption.get("amount") or 0)
        rollback_id = f"rr_fake_{len(self.posts):04d}_{redemption_id}"
        date = _now()
        rollback = api_rollback(
            kind,
            rollback_id,
            redemption_id,
            amount,
            order_id=redemption.get("order", {}).get("id", "ord_card_test"),
            customer_id=redemption.get("customer_id") or "cust_card_test",
            date=date,
        )
        rollback.update({"reason": query.get("reason"), "tracking_id": query.get("tracking_id")})
        if parent is not None:
            rollback["parent_rollback_id"] = parent
        redemption["status"] = "ROLLED_BACK"
        related = redemption.setdefault("related_redemptions", {"rollbacks": [], "redemptions": []})
        related.setdefault("rollbacks", []).append({"id": rollback_id, "date": date})
        self.redemptions[rollback_id] = rollback
        self._by_date = None
        return rollback

    def _rollback(
        self, redemption_id: str, query: dict[str, str]
    ) -> tuple[int, dict[str, str], Any]:
        refused = self._refusal(redemption_id)
        if refused is not None:
            return refused
        return 200, {}, self._roll_back(redemption_id, query)

    def _rollback_stack(
        self, parent_id: str, query: dict[str, str]
    ) -> tuple[int, dict[str, str], Any]:
        """The parent (``object: redemption``) and its children (``redemption`` = parent)."""
        refused = self._refusal(parent_id)
        if refused is not None:
            return refused
        children = [
            key
            for key, obj in self.redemptions.items()
            if obj.get("redemption") == parent_id and obj.get("object") == "redemption"
        ]
        parent = self.redemptions[parent_id]
        parent_rollback_id = f"rr_fake_{len(self.posts):04d}_{parent_id}"
        rollbacks = [self._roll_back(child, query, parent_rollback_id) for child in children]
        date = _now()
        parent_rollback = {
            "id": parent_rollback_id,
            "object": "redemption_rollback",
            "date": date,
            "customer_id": parent.get("customer_id"),
            "tracking_id": query.get("tracking_id"),
            "metadata": None,
            "redemption": parent_id,
            "reason": query.get("reason"),
            "result": "SUCCESS",
            "status": "SUCCEEDED",
            "order": rollbacks[0]["order"] if rollbacks else None,
            "customer": parent.get("customer"),
            "related_object_type": "redemption",
            "related_object_id": parent_id,
        }
        parent["status"] = "ROLLED_BACK"
        related = parent.setdefault("related_redemptions", {"rollbacks": [], "redemptions": []})
        related.setdefault("rollbacks", []).append({"id": parent_rollback_id, "date": date})
        self.redemptions[parent_rollback_id] = parent_rollback
        self._by_date = None
        body = {
            "rollbacks": rollbacks,
            "parent_rollback": parent_rollback,
            "order": parent_rollback["order"],
        }
        return 200, {}, body

    def _balance(self, code: str, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        """The effect: the card's balance moved, a ``*_ADDITION`` transaction appended."""
        voucher = self._voucher(code)
        if voucher is None:
            return 404, {}, _error(404, "not_found", "Resource not found", code)
        amount = int(body.get("amount") or 0)
        gift = voucher.get("gift")
        card = gift if gift else voucher.setdefault("loyalty_card", {})
        card["balance"] = int(card.get("balance") or 0) + amount
        answer = copy.deepcopy(_published("api.voucher-balance.response"))
        answer.update(
            {
                "amount": amount,
                "total": card["balance"],
                "balance": card["balance"],
                "type": "gift_voucher" if gift else "loyalty_card",
                "related_object": {"type": "voucher", "id": voucher.get("id")},
            }
        )
        listed = self.transactions.setdefault(self._card_key(code), [])
        listed.append(
            {
                "id": f"vtx_fake_{len(self.posts):04d}",
                "source_id": body.get("source_id"),
                "voucher_id": voucher.get("id"),
                "campaign_id": voucher.get("campaign_id"),
                "source": "API",
                "reason": body.get("reason"),
                "type": "CREDITS_ADDITION" if gift else "POINTS_ADDITION",
                # A loyalty card's transaction says its points (details.balance.points).
                "details": {
                    "balance": {**answer, "operation_type": "MANUAL"}
                    | ({} if gift else {"points": amount})
                },
                "related_transaction_id": None,
                "created_at": _now(),
            }
        )
        return 200, {}, answer

    def _card_key(self, key: str) -> str:
        """Where a card's transactions are kept: under the key the test gave, else under
        the card's code (Voucherify takes its code or its id)."""
        if key in self.transactions:
            return key
        voucher = self._voucher(key)
        if voucher is None:
            return key
        for alias in (voucher.get("code"), voucher.get("id")):
            if alias in self.transactions:
                return str(alias)
        return str(voucher.get("code") or key)

    def _voucher(self, key: str) -> dict[str, Any] | None:
        """The voucher whose key, ``code`` or ``id`` is ``key`` (Voucherify takes either)."""
        found = self.vouchers.get(key)
        if found is not None:
            return found
        return next(
            (v for v in self.vouchers.values() if key in (v.get("id"), v.get("code"))), None
        )

    def _list(self, query: dict[str, str]) -> tuple[int, dict[str, str], Any]:
        limit, page = int(query.get("limit", "10")), int(query.get("page", "1"))
        if not 1 <= limit <= 100 or not 1 <= page <= self.max_page:
            return 400, {}, {"code": 400, "key": "invalid_param", "message": "Invalid page"}
        after, before = query.get("created_at[after]"), query.get("created_at[before]")
        if self._by_date is None:
            self._by_date = sorted((obj["date"], key) for key, obj in self.redemptions.items())
        by_date = self._by_date
        low = bisect.bisect_right(by_date, (after, "\uffff")) if after else 0
        high = bisect.bisect_left(by_date, (before, "")) if before else len(by_date)
        keys = [key for _, key in by_date[low:high]]
        if query.get("order") != "created_at":
            keys.reverse()  # Voucherify's default: the newest first
        chunk = [self.redemptions[key] for key in keys[(page - 1) * limit : page * limit]]
        body = {
            "object": "list",
            "data_ref": "redemptions",
            "redemptions": chunk,
            "total": len(keys),
        }
        return 200, {}, body


ROLLBACK_WINDOW_KEY = "rollback_window_expired"
"""Not published: the key the fake gives a rollback refused for its age (our choice)."""


def _error(status: int, key: str, message: str, details: str | None = None) -> dict[str, Any]:
    """The published ``Error`` object (no example of it is published)."""
    return {
        "code": status,
        "key": key,
        "message": message,
        "details": details or message,
        "request_id": "v-fake-request",
    }


def _now() -> str:
    moment = datetime.now(UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _voucher_key(path: str) -> str | None:
    """The code (or id) of ``GET /v1/vouchers/<code>``; None for any other path (its
    sub-paths, ``/transactions`` included, are not the voucher)."""
    parts = path.split("/")
    if len(parts) == 4 and parts[:3] == ["", "v1", "vouchers"] and parts[3]:
        return unquote(parts[3])
    return None


def _transactions_page(fake: FakeVoucherify, path: str) -> tuple[int, dict[str, str], Any]:
    """``GET /v1/vouchers/{code}/transactions``: the published list shape (``object``,
    ``data_ref``, ``data``, ``has_more``, ``more_starting_after``), ``order=-id`` or ``id``,
    ``limit`` (10 by default), cursor ``starting_after_id``. (The ledger helper's route.)"""
    parts = urlsplit(path)
    code = fake._card_key(unquote(parts.path.split("/")[3]))
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
            self._send(status, extra, body)

        def do_POST(self) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                payload = json.loads(raw) if raw else {}
            except ValueError:
                payload = {}
            status, extra, body = fake.answer_post(
                self.path, headers, payload if isinstance(payload, dict) else {}
            )
            held = fake.held_after_effect.get(urlsplit(self.path).path)
            if held is not None and status == 200:
                held.wait(timeout=60)
            self._send(status, extra, body)

        def _send(self, status: int, extra: dict[str, str], body: Any) -> None:
            if status == DROP:
                self.close_connection = True
                self.connection.close()
                return
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in {**fake.rate_headers, **extra}.items():
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


# --- API answers built from the published examples --------------------------------------


def _published(name: str) -> dict[str, Any]:
    return dict(json.loads((VOUCHERIFY / f"{name}.example.json").read_text()))


GET_EXAMPLES = {
    "gift": "api.redemption.get.gift-card",
    "loyalty": "api.redemption.get.loyalty-card-pay-with-points",
}
ROLLBACK_EXAMPLES = {
    "gift": "api.redemption-rollback.response.gift-card",
    "loyalty": "api.redemption-rollback.response.loyalty-card",
}


def _moved(obj: dict[str, Any], kind: str, amount: int) -> None:
    """The amount in the top-level object of the card's kind, as the examples show it."""
    obj.pop("gift", None)
    obj.pop("loyalty_card", None)
    if kind == "gift":
        obj["gift"] = {"amount": amount}
    else:
        obj["loyalty_card"] = {"points": amount}


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
    rollbacks: list[dict[str, str]] | None = None,
    voucher_id: str | None = None,
    voucher_code: str | None = None,
) -> dict[str, Any]:
    """``GET /v1/redemptions/<r_id>`` of a gift or loyalty card redemption: the published
    "Gift Card" / "Loyalty Card - Pay with Points" example, re-keyed (``status`` is in
    the schema, not in the examples); ``voucher_id`` / ``voucher_code``: another card than
    the example's. Its ``voucher`` names no holder, as published."""
    redemption = copy.deepcopy(_published(GET_EXAMPLES[kind]))
    if voucher_id is not None:
        redemption["voucher"]["id"] = voucher_id
    if voucher_code is not None:
        redemption["voucher"]["code"] = voucher_code
    redemption.update(
        {
            "id": redemption_id,
            "date": date,
            "customer_id": customer_id,
            "amount": amount,
            "redemption": None,  # not part of a stack
            "result": "SUCCESS",
            "status": status,
            "related_redemptions": {
                "rollbacks": rollbacks
                if rollbacks is not None
                else ([{"id": rollback_id, "date": rollback_date}] if rollback_id else []),
                "redemptions": [],
            },
        }
    )
    rolled_back = status == "ROLLED_BACK"
    redemption["order"].update(
        {
            "id": order_id,
            "customer_id": customer_id,
            "status": "CANCELED" if rolled_back else "PAID",
            # The order as it is now: changed last by the rollback, else by the redemption.
            "updated_at": rollback_date if rolled_back else date,
        }
    )
    redemption["customer"]["id"] = customer_id
    _moved(redemption, kind, amount)
    return redemption


def api_rollback(
    kind: str,
    rollback_id: str,
    redemption_id: str,
    amount: int,
    order_id: str = "ord_card_test",
    customer_id: str = "cust_card_test",
    date: str = "2024-02-01T10:23:52.499Z",
    result: str = "SUCCESS",
) -> dict[str, Any]:
    """``GET /v1/redemptions/<rr_id>``: the published REST rollback, re-keyed, without the
    ``voucher.type`` the rollback response example has and the GET examples lack."""
    rollback = copy.deepcopy(_published(ROLLBACK_EXAMPLES[kind]))
    failed = result != "SUCCESS"
    rollback.update(
        {
            "id": rollback_id,
            "redemption": redemption_id,
            "date": date,
            "customer_id": customer_id,
            "amount": -abs(amount),
            "reason": "Customer returned the order",
            "result": result,
            "status": "FAILED" if failed else "SUCCEEDED",
        }
    )
    if failed:
        rollback.update({"failure_code": "already_rolled_back", "failure_message": "Rolled back"})
    rollback["voucher"].pop("type", None)
    rollback["order"].update(
        {"id": order_id, "customer_id": customer_id, "status": "CANCELED", "updated_at": date}
    )
    if failed:  # a refused rollback changed nothing: the order as the redemption left it
        rollback["order"].update({"status": "PAID", "updated_at": None})
    rollback["customer"]["id"] = customer_id
    _moved(rollback, kind, -abs(amount))
    return rollback


def api_failed(redemption_id: str, date: str) -> dict[str, Any]:
    """A failed redemption of the published listing, re-keyed."""
    failed = next(
        r for r in _published("api.redemptions.list")["redemptions"] if r["result"] == "FAILURE"
    )
    failed = copy.deepcopy(failed)
    failed.update({"id": redemption_id, "date": date})
    return dict(failed)


VOUCHER_EXAMPLES = {
    "gift": "api.voucher.get.gift-card",
    "loyalty": "api.voucher.get.loyalty-card",
}


def api_voucher(
    kind: str,
    voucher_id: str,
    code: str,
    holder_id: str | None = "cust_card_test",
    balance: int = 8000,
) -> dict[str, Any]:
    """``GET /v1/vouchers/<code>`` of a gift or loyalty card: the published "Gift Card" /
    "Loyalty Card" example, re-keyed, with its holder (None: a card nobody holds, the
    schema's null) and its balance now (``gift.balance`` / ``loyalty_card.balance``)."""
    voucher = copy.deepcopy(_published(VOUCHER_EXAMPLES[kind]))
    voucher.update({"id": voucher_id, "code": code, "holder_id": holder_id})
    if kind == "gift":
        voucher["gift"]["balance"] = balance
    else:
        voucher["loyalty_card"]["balance"] = balance
    return voucher
