"""The handlers' SQL, kept together. ``%(name)s`` parameters only, never formatting."""

from schemas.vocabulary import LedgerEffect

EFFECTS = {"debit": LedgerEffect.DEBIT, "restore": LedgerEffect.RESTORE}
"""The ``%(debit)s`` / ``%(restore)s`` of the statements that copy a debit into a restore."""

UPSERT_ORDER = """
INSERT INTO orders AS o (order_id, status, amount, total_amount, customer_id, source_updated_at)
VALUES (%(order_id)s, %(status)s, %(amount)s, %(total_amount)s, %(customer_id)s, %(at)s)
ON CONFLICT (order_id) DO UPDATE SET
    status = CASE
        WHEN o.status IS NULL THEN EXCLUDED.status
        WHEN EXISTS (SELECT 1 FROM order_transitions t
                     WHERE t.from_status = o.status AND t.to_status = EXCLUDED.status)
            THEN EXCLUDED.status
        ELSE o.status END,
    -- Amounts from the newest snapshot that carries them.
    amount = CASE WHEN EXCLUDED.amount IS NOT NULL
                   AND (o.amount IS NULL OR EXCLUDED.source_updated_at >= o.source_updated_at)
              THEN EXCLUDED.amount ELSE o.amount END,
    total_amount = CASE WHEN EXCLUDED.total_amount IS NOT NULL
                   AND (o.total_amount IS NULL OR EXCLUDED.source_updated_at >= o.source_updated_at)
              THEN EXCLUDED.total_amount ELSE o.total_amount END,
    customer_id = COALESCE(o.customer_id, EXCLUDED.customer_id),
    source_updated_at = GREATEST(o.source_updated_at, EXCLUDED.source_updated_at),
    updated_at = now()
"""

# Records a redemption; an existing row only gets its missing columns filled and its
# status moved along an allowed transition.
UPSERT_REDEMPTION = """
INSERT INTO redemptions AS r (
    redemption_id, status, parent_redemption_id, order_id, customer_id, voucher_id,
    voucher_code, voucher_type, amount, redeemed_at, failure_code, failure_message,
    rollback_id, rollback_at, rollback_reason, last_event_at)
VALUES (
    %(redemption_id)s, %(status)s, %(parent_redemption_id)s, %(order_id)s, %(customer_id)s,
    %(voucher_id)s, %(voucher_code)s, %(voucher_type)s, %(amount)s, %(redeemed_at)s,
    %(failure_code)s, %(failure_message)s, %(rollback_id)s, %(rollback_at)s,
    %(rollback_reason)s, %(at)s)
ON CONFLICT (redemption_id) DO UPDATE SET
    status = CASE
        WHEN EXISTS (SELECT 1 FROM redemption_transitions t
                     WHERE t.from_status = r.status AND t.to_status = EXCLUDED.status)
            THEN EXCLUDED.status
        ELSE r.status END,
    parent_redemption_id = COALESCE(r.parent_redemption_id, EXCLUDED.parent_redemption_id),
    order_id = COALESCE(r.order_id, EXCLUDED.order_id),
    customer_id = COALESCE(r.customer_id, EXCLUDED.customer_id),
    voucher_id = COALESCE(r.voucher_id, EXCLUDED.voucher_id),
    voucher_code = COALESCE(r.voucher_code, EXCLUDED.voucher_code),
    voucher_type = COALESCE(r.voucher_type, EXCLUDED.voucher_type),
    amount = COALESCE(r.amount, EXCLUDED.amount),
    redeemed_at = COALESCE(r.redeemed_at, EXCLUDED.redeemed_at),
    failure_code = COALESCE(r.failure_code, EXCLUDED.failure_code),
    failure_message = COALESCE(r.failure_message, EXCLUDED.failure_message),
    rollback_id = COALESCE(r.rollback_id, EXCLUDED.rollback_id),
    rollback_at = COALESCE(r.rollback_at, EXCLUDED.rollback_at),
    rollback_reason = COALESCE(r.rollback_reason, EXCLUDED.rollback_reason),
    last_event_at = GREATEST(r.last_event_at, EXCLUDED.last_event_at),
    updated_at = now()
"""

# At most one debit and one restore per redemption: the UNIQUE key makes a second one
# impossible, whatever the deliveries and their order.
INSERT_LEDGER_ENTRY = """
INSERT INTO ledger_entries (customer_id, voucher_id, voucher_code, kind, amount,
                            redemption_id, effect, reason, event_id)
VALUES (%(customer_id)s, %(voucher_id)s, %(voucher_code)s, %(kind)s, %(amount)s,
        %(redemption_id)s, %(effect)s, %(reason)s, %(event_id)s)
ON CONFLICT (redemption_id, effect) DO NOTHING
"""

# A restore whose amount the rollback event did not carry: mirror the debit, if known.
RESTORE_FROM_DEBIT = """
INSERT INTO ledger_entries (customer_id, voucher_id, voucher_code, kind, amount,
                            redemption_id, effect, reason, event_id)
SELECT customer_id, voucher_id, voucher_code, kind, -amount, redemption_id, %(restore)s,
       %(reason)s, %(event_id)s
FROM ledger_entries
WHERE redemption_id = %(redemption_id)s AND effect = %(debit)s
ON CONFLICT (redemption_id, effect) DO NOTHING
"""

# The rollback came first and could not tell how much to restore; the redemption now
# tells what was debited: restore that.
RESTORE_IF_ROLLED_BACK = """
INSERT INTO ledger_entries (customer_id, voucher_id, voucher_code, kind, amount,
                            redemption_id, effect, reason, event_id)
SELECT d.customer_id, d.voucher_id, d.voucher_code, d.kind, -d.amount, d.redemption_id,
       %(restore)s, 'rollback', %(event_id)s
FROM ledger_entries d
JOIN redemptions r ON r.redemption_id = d.redemption_id AND r.status = %(rolled_back)s
WHERE d.redemption_id = %(redemption_id)s AND d.effect = %(debit)s
ON CONFLICT (redemption_id, effect) DO NOTHING
"""

UPSERT_CARD_BALANCE = """
INSERT INTO card_balances AS c (voucher_id, voucher_code, kind, customer_id,
                                reported_balance, reported_at)
VALUES (%(voucher_id)s, %(voucher_code)s, %(kind)s, %(customer_id)s, %(balance)s, %(at)s)
ON CONFLICT (voucher_id) DO UPDATE SET
    reported_balance = EXCLUDED.reported_balance,
    reported_at = EXCLUDED.reported_at,
    voucher_code = COALESCE(c.voucher_code, EXCLUDED.voucher_code),
    customer_id = COALESCE(c.customer_id, EXCLUDED.customer_id),
    updated_at = now()
WHERE EXCLUDED.reported_at > c.reported_at
"""

INSERT_ROLLBACK_FLAG = """
INSERT INTO flags (category, redemption_id, rollback_id, voucher_id, failure_code,
                   failure_message, event_id)
VALUES (%(category)s, %(redemption_id)s, %(rollback_id)s, %(voucher_id)s, %(failure_code)s,
        %(failure_message)s, %(event_id)s)
ON CONFLICT (rollback_id) WHERE rollback_id IS NOT NULL DO NOTHING
"""

TOUCH_REDEMPTION = """
UPDATE redemptions SET last_event_at = GREATEST(last_event_at, %(at)s), updated_at = now()
WHERE redemption_id = %(redemption_id)s
"""

OUR_STATUS = "SELECT status FROM redemptions WHERE redemption_id = %(redemption_id)s"
