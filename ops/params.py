"""Parsing what operators type (limits, cursors, times) and writing what they read (JSON).

Shared by the API, the dashboard and the CLI so the three accept the same values.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
EVENT_STATUSES = ("received", "processed", "ignored", "failed", "dead")
FLAG_STATUSES = ("open", "resolved")
FLAG_CATEGORIES = ("already_rolled_back", "review", "drift")

_RELATIVE = re.compile(r"^(\d+)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class ParamError(ValueError):
    """A parameter an operator gave cannot be used; the message says which and why."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


def parse_limit(raw: str | int | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    try:
        value = int(raw)
    except ValueError:
        raise ParamError("limit", f"expected an integer from 1 to {MAX_LIMIT}") from None
    if not 1 <= value <= MAX_LIMIT:
        raise ParamError("limit", f"expected an integer from 1 to {MAX_LIMIT}")
    return value


def parse_id(name: str, raw: str | int | None) -> int | None:
    """A bigserial id (a flag, a dead letter) or a cursor made of one."""
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ParamError(name, "expected an integer id") from None
    if not 0 < value < 2**63:
        raise ParamError(name, "expected a positive integer id")
    return value


def parse_time(name: str, raw: str | None, now: datetime | None = None) -> datetime | None:
    """ISO 8601 (``2024-02-01``, ``2024-02-01T10:30:00Z``; naive means UTC), ``today``,
    ``yesterday``, or an age such as ``90m``, ``24h``, ``7d`` (that long ago)."""
    if raw is None or raw.strip() == "":
        return None
    text = raw.strip()
    now = now or datetime.now(UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if text == "now":
        return now
    if text == "today":
        return midnight
    if text == "yesterday":
        return midnight - timedelta(days=1)
    relative = _RELATIVE.match(text)
    if relative:
        amount, unit = int(relative.group(1)), relative.group(2)
        return now - timedelta(**{_UNITS[unit]: amount})
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ParamError(
            name, "expected an ISO 8601 time, 'today', 'yesterday' or an age like 24h"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def parse_statuses(raw: list[str] | None) -> list[str] | None:
    """Event statuses, repeated or comma-separated; None means any."""
    if not raw:
        return None
    statuses = [s.strip() for item in raw for s in item.split(",") if s.strip()]
    if "any" in statuses:
        return None
    for status in statuses:
        if status not in EVENT_STATUSES:
            raise ParamError("status", f"expected any of {', '.join(EVENT_STATUSES)}")
    return statuses or None


def parse_choice(name: str, raw: str | None, choices: tuple[str, ...]) -> str | None:
    if raw is None or raw == "":
        return None
    if raw not in choices:
        raise ParamError(name, f"expected one of {', '.join(choices)}")
    return raw


def parse_bool(name: str, raw: str | None) -> bool | None:
    if raw is None or raw == "":
        return None
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise ParamError(name, "expected true or false")


def encode_event_cursor(cursor: tuple[datetime, str] | None) -> str | None:
    """The events list's cursor: (received_at, event_id) of the last row, opaque to callers."""
    if cursor is None:
        return None
    raw = json.dumps([cursor[0].isoformat(), cursor[1]], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_event_cursor(raw: str | None) -> tuple[datetime, str] | None:
    if not raw:
        return None
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        at, event_id = json.loads(text)
        return datetime.fromisoformat(at), str(event_id)
    except (ValueError, TypeError, binascii.Error):
        raise ParamError("cursor", "not a cursor this API returned") from None


def to_jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(document: Any, pretty: bool = False) -> str:
    if pretty:
        return json.dumps(document, default=to_jsonable, indent=2, sort_keys=False)
    return json.dumps(document, default=to_jsonable, separators=(",", ":"))
