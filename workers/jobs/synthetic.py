"""The webhook a job heals with: built as Voucherify would have sent it, so that it goes
through the same apply code as a delivery (``process_delivery``) and is recorded like one.

Its ``source`` names the job (``{"id": "verify" | "drift", "object": "reconciliation"}``),
and its event id is the job's own (``verify:…``, ``drift:…``): the inbox applies it once.
"""

from __future__ import annotations

import json
from typing import Any


def source_of(job: str) -> dict[str, str]:
    return {"id": job, "object": "reconciliation"}


def webhook_body(
    job: str, event_id: str, event_type: str, data: dict[str, Any], created_at: str
) -> str:
    """The raw body, v2024-01-01 envelope, as a delivery carries it."""
    return json.dumps(
        {
            "id": event_id,
            "created_at": created_at,
            "type": event_type,
            "data": data,
            "source": source_of(job),
            "event": {"id": event_id, "type": event_type, "created_at": created_at},
        },
        separators=(",", ":"),
    )
