"""The Voucherify webhook envelope (v2024-01-01): identity and type of a delivery.

Read with plain dict look-ups, not marshmallow: every delivery needs its key and type
(also the ones we ignore or dead-letter), and this is the cheapest correct way to get them.
The event's fields are loaded by the per-type schemas in ``schemas.redemption``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LEGACY_FORMAT = "legacy-v2018-08-01"


@dataclass(frozen=True, slots=True)
class Envelope:
    """Who a delivery is and what it carries."""

    event_id: str | None
    """``event.id``, else the envelope ``id``; None when the body carries neither."""
    type: str
    """``event.type`` when present, else the top-level ``type`` ('' when neither)."""
    event_created_at: str | None
    data: Any
    format: str
    """``v2024-01-01``, or ``legacy-v2018-08-01`` for the retired format."""


def read_envelope(body: dict[str, Any]) -> Envelope:
    event = body.get("event")
    event = event if isinstance(event, dict) else {}
    event_id = _text(event.get("id")) or _text(body.get("id"))
    event_type = _text(event.get("type")) or _text(body.get("type")) or ""
    created_at = _text(event.get("created_at")) or _text(body.get("created_at"))
    # The retired v2018-08-01 format: {"id": <event id>, "object": "event", "data": {"object": …}}
    legacy = body.get("object") == "event" and "event" not in body
    return Envelope(
        event_id=event_id,
        type=event_type,
        event_created_at=created_at,
        data=body.get("data"),
        format=LEGACY_FORMAT if legacy else "v2024-01-01",
    )


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value
    return None
