"""Migration 0006 moves the ledger to the card: existing entries keep who redeemed, are
attributed to the holder their event names, and get the movement time they were measured
by; existing cards are measured from their next movement, not flagged."""

from __future__ import annotations

import time

from psycopg_pool import ConnectionPool

from tests.migrations import migrated_across
from workers.jobs.drift import DriftResult, check_drift

LEGACY = """
INSERT INTO events (event_id, type, payload, received_at) VALUES
    ('ev_1', 'redemption.succeeded',
     '{"data": {"voucher": {"id": "v_1", "holder_id": "cust_holder"}}}', now());
INSERT INTO redemptions (redemption_id, status, redeemed_at) VALUES
    ('r_1', 'SUCCEEDED', '2024-01-01T10:00:00Z'), ('r_2', 'SUCCEEDED', '2024-01-02T10:00:00Z');
INSERT INTO ledger_entries (customer_id, voucher_id, kind, amount, redemption_id, effect,
                            reason, event_id) VALUES
    ('cust_redeemer', 'v_1', 'gift_credit', -100, 'r_1', 'debit', 'redemption', 'ev_1'),
    ('cust_redeemer', 'v_1', 'gift_credit', -50, 'r_2', 'debit', 'redemption', 'ev_pruned');
INSERT INTO card_balances (voucher_id, kind, customer_id, reported_balance, reported_at)
VALUES ('v_1', 'gift_credit', 'cust_redeemer', 700, '2024-01-02T10:00:00Z');
"""


def test_existing_entries_move_to_the_holder_keep_the_redeemer_and_do_not_drift(
    postgres_server: str,
) -> None:
    entries = (
        "SELECT redemption_id, customer_id, redeemer_id, moved_at::text, balance_after"
        " FROM ledger_entries ORDER BY redemption_id"
    )
    with migrated_across(postgres_server, "0006_card_ledger", LEGACY, entries) as (url, rows):
        assert rows == [
            ("r_1", "cust_holder", "cust_redeemer", "2024-01-01 10:00:00+00", None),
            ("r_2", "cust_redeemer", "cust_redeemer", "2024-01-02 10:00:00+00", None),
        ]
        with ConnectionPool(url, min_size=1, max_size=1) as pool:
            result = check_drift(pool, time.monotonic() + 30, quiet_seconds=0)
        # No movement reports a balance after yet: the card is counted unmeasured, not checked.
        assert result == DriftResult(unmeasured=1)
