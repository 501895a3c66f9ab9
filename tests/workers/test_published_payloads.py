"""Every payload Voucherify's published webhook schemas allow, for every type we handle,
is applied: never a dead letter (issue 11's first promise). Payloads come from
``devtools.payloads``: any Unicode in any free-text field (``\\u0000`` and lone
surrogates included), objects null or missing their optional fields, every enum value,
extra fields; each of the redemption family carries its redemption id (and its rollback
id). The card movement types need no id to be applied: one without a transaction id
reports the card's balance and keys no movement."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from psycopg_pool import ConnectionPool

from devtools.payloads import webhook_envelope
from devtools.webhooks import REDEMPTION_FAMILY
from workers.handlers.cards import CARD_MOVEMENT_TYPES
from workers.handlers.orders import ORDER_EVENT_TYPES
from workers.processing import process_delivery

EXAMPLES = 40


def as_sent(document: dict[str, Any], raw_unicode: bool) -> str:
    """The body as it comes off the wire (UTF-8): with non-ASCII characters as they are or
    escaped, and a lone surrogate, which UTF-8 cannot carry, always escaped."""
    if raw_unicode:
        body = json.dumps(document, ensure_ascii=False)
        try:
            body.encode("utf-8")
        except UnicodeEncodeError:
            pass
        else:
            return body
    return json.dumps(document)


@pytest.mark.parametrize("event_type", REDEMPTION_FAMILY + CARD_MOVEMENT_TYPES + ORDER_EVENT_TYPES)
def test_every_published_payload_of_a_handled_type_is_applied(
    database_url: str, db: psycopg.Connection[Any], event_type: str
) -> None:
    # Generated first, then applied through a pool opened after: a pool's threads use
    # ``random``, which hypothesis would count against the strategy.
    documents: list[dict[str, Any]] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(document=webhook_envelope(event_type, surrogates=True))
    def generate(document: dict[str, Any]) -> None:
        documents.append(document)

    generate()
    outcomes: dict[str, int] = {}
    with ConnectionPool(database_url, min_size=1, max_size=2) as pool:
        for index, document in enumerate(documents):
            body = as_sent(document, raw_unicode=index % 2 == 0)
            delivery_id, at = uuid.uuid4().hex, datetime.now(UTC).isoformat()
            outcome = process_delivery(pool, body, delivery_id, at)
            outcomes[outcome.status] = outcomes.get(outcome.status, 0) + 1
            assert outcome.status in ("processed", "duplicate"), (outcome, body[:2000])
    assert outcomes.get("processed", 0) > 0, outcomes
    assert db.execute("SELECT count(*) FROM dead_letters").fetchone() == (0,)
