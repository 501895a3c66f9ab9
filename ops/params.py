"""Parsing what operators type (limits, cursors, times, choices) and writing what they read
(JSON).

The low-level parsers of ``ops.service``'s filters, so the API, the dashboard and the CLI
accept the same values. The words (statuses, categories) come from ``schemas.vocabulary``.
A ``Query`` is what a front-end was given, by name: a query string
(``request.args.to_dict(flat=False)``), a form, the CLI's options.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any, TypeVar

from schemas.vocabulary import EventStatus, values

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_NOTE_CHARS = 2000
ANY = "any"
"""The status filter's word for "every status"."""

Query = Mapping[str, str | Sequence[str] | None]
"""Parameters by name; a name given more than once maps to the list of its values."""

E = TypeVar("E", bound=StrEnum)

_RELATIVE = re.compile(r"^(\d+)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class ParamError(ValueError):
    """A parameter an operator gave cannot be used; the message says which and why."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


def first(query: Query, name: str) -> str | None:
    """The (first) value of ``name``; None when absent or empty."""
    value = query.get(name)
    if value is not None and not isinstance(value, str):
        value = value[0] if value else None
    return value or None


def every(query: Query, name: str) -> list[str]:
    """Every value of ``name``, in order (none when absent)."""
    value = query.get(name)
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def one_of(words: Sequence[str]) -> str:
    """``a, b or c``: for help texts and error messages."""
    if len(words) < 2:
        return "".join(words)
    return f"{', '.join(words[:-1])} or {words[-1]}"


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


def parse_statuses(raw: Sequence[str]) -> tuple[EventStatus, ...] | None:
    """Event statuses, repeated or comma-separated; None means any (nothing, or ``any``)."""
    words = [s.strip() for item in raw for s in item.split(",") if s.strip()]
    if not words or ANY in words:
        return None
    try:
        return tuple(EventStatus(word) for word in words)
    except ValueError:
        raise ParamError("status", f"expected any of {', '.join(values(EventStatus))}") from None


def parse_choice(name: str, raw: str | None, choices: type[E]) -> E | None:
    """One member of the StrEnum ``choices``, by its text."""
    if raw is None or raw == "":
        return None
    try:
        return choices(raw)
    except ValueError:
        raise ParamError(name, f"expected one of {', '.join(values(choices))}") from None


def parse_bool(name: str, raw: str | None) -> bool | None:
    if raw is None or raw == "":
        return None
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise ParamError(name, "expected true or false")


def parse_note(raw: object) -> str | None:
    """What was done about a flag: a string of at most ``MAX_NOTE_CHARS``, or None."""
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ParamError("note", "expected a string")
    if len(raw) > MAX_NOTE_CHARS:
        raise ParamError("note", f"at most {MAX_NOTE_CHARS} characters")
    return raw


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
