"""Migration 0015 turns the entries the old handlers keyed by a stack's parent (a card
transaction naming the parent before the child on that card was known) into waiting
entries, and hands each to the child on its card where that child is already known; the
parent's own entries and ordinary ones are left as they were."""

from __future__ import annotations

from tests.migrations import migrated_across

# Two stacks' parents (the old key allowed one parent-keyed debit each): p_1's child c_gift
# on card v_gift is known, p_2's child on v_points is not yet. r_plain is an ordinary
# redemption with its own debit.
BEFORE = """
INSERT INTO redemptions (redemption_id, status, parent_redemption_id, voucher_id) VALUES
    ('p_1', 'SUCCEEDED', NULL, NULL),
    ('p_2', 'SUCCEEDED', NULL, NULL),
    ('c_gift', 'SUCCEEDED', 'p_1', 'v_gift'),
    ('r_plain', 'SUCCEEDED', NULL, 'v_plain');
INSERT INTO ledger_entries (customer_id, voucher_id, kind, amount, redemption_id, effect,
                            reason, event_id, moved_at, transaction_id) VALUES
    ('cust', 'v_gift', 'gift_credit', -300, 'p_1', 'debit', 'redemption', 'ev_1',
     '2024-01-01T10:00:00Z', 'vtx_gift'),
    ('cust', 'v_points', 'loyalty_points', -40, 'p_2', 'debit', 'redemption', 'ev_2',
     '2024-01-01T10:00:00Z', 'vtx_points'),
    ('cust', 'v_plain', 'gift_credit', -100, 'r_plain', 'debit', 'redemption', 'ev_3',
     '2024-01-01T10:00:00Z', 'vtx_plain');
"""


def test_parent_keyed_transactions_wait_for_their_child_or_go_to_the_known_one(
    postgres_server: str,
) -> None:
    entries = (
        "SELECT transaction_id, redemption_id, stack_parent_id, effect, amount"
        " FROM ledger_entries ORDER BY transaction_id"
    )
    migration = "0015_stack_waiting_entries"
    with migrated_across(postgres_server, migration, BEFORE, entries) as (_, rows):
        assert rows == [
            ("vtx_gift", "c_gift", None, "debit", -300),
            ("vtx_plain", "r_plain", None, "debit", -100),
            ("vtx_points", None, "p_2", "debit", -40),
        ]
