"""The handlers' SQL, kept together. ``%(name)s`` parameters only, never formatting."""

from schemas.vocabulary import LedgerEffect

EFFECTS = {
    "debit": LedgerEffect.DEBIT,
    "restore": LedgerEffect.RESTORE,
    "movement": LedgerEffect.MOVEMENT,
}
"""The ``%(debit)s`` / ``%(restore)s`` of the statements that copy a debit into a restore."""

# An order's row follows its latest change (migrations/0008_order_changes.sql): a change
# wins when its version, (status_at, status rank), is greater than the row's
# (order_change_wins), so any arrival order and any number of deliveries end in the same
# row. A snapshot without a status never moves it; amounts come with the winning change,
# or fill what the row lacks.
UPSERT_ORDER = """
INSERT INTO orders AS o (order_id, status, amount, total_amount, customer_id,
                         source_updated_at, status_at, last_event_id, last_event_type)
VALUES (%(order_id)s, %(status)s, %(amount)s, %(total_amount)s, %(customer_id)s, %(at)s,
        CASE WHEN %(status)s::text IS NOT NULL THEN %(at)s END,
        CASE WHEN %(status)s::text IS NOT NULL THEN %(event_id)s END,
        CASE WHEN %(status)s::text IS NOT NULL THEN %(event_type)s END)
ON CONFLICT (order_id) DO UPDATE SET
    (status, status_at, last_event_id, last_event_type, amount, total_amount) = (
        SELECT CASE WHEN w THEN EXCLUDED.status ELSE o.status END,
               CASE WHEN w THEN EXCLUDED.status_at ELSE o.status_at END,
               CASE WHEN w THEN EXCLUDED.last_event_id ELSE o.last_event_id END,
               CASE WHEN w THEN EXCLUDED.last_event_type ELSE o.last_event_type END,
               CASE WHEN w OR o.amount IS NULL THEN COALESCE(EXCLUDED.amount, o.amount)
                    ELSE o.amount END,
               CASE WHEN w OR o.total_amount IS NULL
                    THEN COALESCE(EXCLUDED.total_amount, o.total_amount)
                    ELSE o.total_amount END
        FROM (SELECT order_change_wins(EXCLUDED.status, EXCLUDED.status_at,
                                       o.status, o.status_at) AS w) AS change),
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

# The ledger (migrations/0006_card_ledger.sql): customer_id is the card's holder, redeemer_id
# the customer who redeemed. At most one debit and one restore per redemption (the UNIQUE
# key), whatever the deliveries and their order; a second report of the same entry (the
# redemption's transaction, a duplicate) only fills in what the first one lacked.
INSERT_LEDGER_ENTRY = """
INSERT INTO ledger_entries AS l (customer_id, redeemer_id, voucher_id, voucher_code, kind,
                                 amount, redemption_id, effect, reason, event_id, moved_at,
                                 balance_after)
VALUES (%(customer_id)s, %(redeemer_id)s, %(voucher_id)s, %(voucher_code)s, %(kind)s,
        %(amount)s, %(redemption_id)s, %(effect)s, %(reason)s, %(event_id)s,
        COALESCE(%(moved_at)s, now()), %(balance_after)s)
ON CONFLICT (redemption_id, effect) DO UPDATE SET
    customer_id = COALESCE(l.customer_id, EXCLUDED.customer_id),
    redeemer_id = COALESCE(l.redeemer_id, EXCLUDED.redeemer_id),
    voucher_id = COALESCE(l.voucher_id, EXCLUDED.voucher_id),
    voucher_code = COALESCE(l.voucher_code, EXCLUDED.voucher_code),
    balance_after = COALESCE(l.balance_after, EXCLUDED.balance_after),
    updated_at = now()
"""

# A restore whose amount the rollback event did not carry: mirror the debit, if known.
RESTORE_FROM_DEBIT = """
INSERT INTO ledger_entries (customer_id, redeemer_id, voucher_id, voucher_code, kind, amount,
                            redemption_id, effect, reason, event_id, moved_at, balance_after)
SELECT customer_id, redeemer_id, voucher_id, voucher_code, kind, -amount, redemption_id,
       %(restore)s, %(reason)s, %(event_id)s, COALESCE(%(moved_at)s, now()), %(balance_after)s
FROM ledger_entries
WHERE redemption_id = %(redemption_id)s AND effect = %(debit)s
ON CONFLICT (redemption_id, effect) DO NOTHING
"""

# The rollback came first and could not tell how much to restore; the redemption now
# tells what was debited: restore that, at the rollback's date. Only the debit of the
# redemption's own card: a stack's parent has none (its children's are theirs).
RESTORE_IF_ROLLED_BACK = """
INSERT INTO ledger_entries (customer_id, redeemer_id, voucher_id, voucher_code, kind, amount,
                            redemption_id, effect, reason, event_id, moved_at)
SELECT d.customer_id, d.redeemer_id, d.voucher_id, d.voucher_code, d.kind, -d.amount,
       d.redemption_id, %(restore)s, 'rollback', %(event_id)s,
       COALESCE(r.rollback_at, r.last_event_at, now())
FROM ledger_entries d
JOIN redemptions r ON r.redemption_id = d.redemption_id AND r.status = %(rolled_back)s
                  AND r.voucher_id = d.voucher_id
WHERE d.redemption_id = %(redemption_id)s AND d.effect = %(debit)s
ON CONFLICT (redemption_id, effect) DO NOTHING
"""

# A card transaction of a redemption or its rollback (CREDITS_REDEMPTION, POINTS_REFUND, ...):
# the same entry as the redemption or rollback webhook's. Its figures are the movement's
# own (Voucherify's transaction), so they replace what the webhook said; the rest is
# filled in. A movement row an under-described event of the same transaction made first
# (no type) gives way to it (DELETE_OTHER_ENTRIES_OF_TRANSACTION).
UPSERT_REDEMPTION_MOVEMENT = """
INSERT INTO ledger_entries AS l (customer_id, voucher_id, voucher_code, kind, amount,
                                 redemption_id, effect, reason, event_id, moved_at,
                                 balance_after, transaction_id)
VALUES (%(customer_id)s, %(voucher_id)s, %(voucher_code)s, %(kind)s, %(amount)s,
        %(redemption_id)s, %(effect)s, %(reason)s, %(event_id)s, COALESCE(%(moved_at)s, now()),
        %(balance_after)s, %(transaction_id)s)
ON CONFLICT (redemption_id, effect) DO UPDATE SET
    transaction_id = EXCLUDED.transaction_id,
    amount = EXCLUDED.amount,
    moved_at = EXCLUDED.moved_at,
    balance_after = COALESCE(EXCLUDED.balance_after, l.balance_after),
    customer_id = COALESCE(l.customer_id, EXCLUDED.customer_id),
    voucher_id = COALESCE(l.voucher_id, EXCLUDED.voucher_id),
    voucher_code = COALESCE(l.voucher_code, EXCLUDED.voucher_code),
    updated_at = now()
"""

# The transaction's entry under another key gives way to the one it is now known to be:
# a movement row an under-described event made, or an entry that waited for a stack's
# child (or was keyed by the parent) before the child was known. ``%(redemption_id)s``
# NULL: the entry waits (UPSERT_WAITING_MOVEMENT), and a waiting one stays.
DELETE_OTHER_ENTRIES_OF_TRANSACTION = """
DELETE FROM ledger_entries
WHERE transaction_id = %(transaction_id)s
  AND (effect = %(movement)s OR effect <> %(effect)s
       OR redemption_id IS DISTINCT FROM %(redemption_id)s::text)
"""

# A movement's balance after: a report of the movement's own replaces one read from the
# card's snapshot in the event's voucher (``balance_from_snapshot``), never the other way;
# otherwise the first report stays (migrations/0013_accruals.sql).
_NEWER_BALANCE = """%(balance_after)s::bigint IS NOT NULL
          AND (l.balance_after IS NULL
               OR (l.balance_from_snapshot AND NOT %(balance_from_snapshot)s::boolean))"""
_BALANCE_SET = f"""
    balance_after = CASE WHEN {_NEWER_BALANCE}
                         THEN %(balance_after)s::bigint ELSE l.balance_after END,
    balance_from_snapshot = CASE WHEN {_NEWER_BALANCE}
                                 THEN %(balance_from_snapshot)s::boolean
                                 ELSE l.balance_from_snapshot END"""

# A movement of no redemption (top-up, accrual, expiry, activation, manual change): one per
# transaction id; the transaction event and its balance event twin are one entry. An
# accrual's entry carries its key too (``ACCRUAL_ENTRIES``).
UPSERT_MOVEMENT = f"""
INSERT INTO ledger_entries AS l (customer_id, voucher_id, voucher_code, kind, amount,
                                 effect, reason, event_id, moved_at, balance_after,
                                 balance_from_snapshot, transaction_id, accrual_key)
VALUES (%(customer_id)s, %(voucher_id)s, %(voucher_code)s, %(kind)s, %(amount)s,
        %(movement)s, %(reason)s, %(event_id)s, COALESCE(%(moved_at)s, now()),
        %(balance_after)s, %(balance_from_snapshot)s, %(transaction_id)s, %(accrual_key)s)
ON CONFLICT (transaction_id) DO UPDATE SET{_BALANCE_SET},
    customer_id = COALESCE(l.customer_id, EXCLUDED.customer_id),
    voucher_id = COALESCE(l.voucher_id, EXCLUDED.voucher_id),
    voucher_code = COALESCE(l.voucher_code, EXCLUDED.voucher_code),
    updated_at = now()
"""  # noqa: S608 - constant fragments only, no input

# The entries an accrual's event may be: the one of its transaction or of its key (exact),
# else (loose) the one entry of the other half on the card with the same amount and
# balance after -- a balance event names the transaction but not its earning rule, a
# rewarded event the rule but not the transaction. The card's row is locked (the card's
# report comes first), so the events of one card take their turns here.
ACCRUAL_ENTRIES = """
SELECT id, transaction_id, accrual_key,
       (transaction_id = %(transaction_id)s OR accrual_key = %(accrual_key)s) AS exact
FROM ledger_entries
WHERE effect = %(movement)s AND voucher_id = %(voucher_id)s
  AND (transaction_id = %(transaction_id)s OR accrual_key = %(accrual_key)s
       OR (amount = %(amount)s AND balance_after = %(balance_after)s
           AND NOT balance_from_snapshot
           AND CASE WHEN %(transaction_id)s::text IS NULL
                    THEN transaction_id IS NOT NULL AND accrual_key IS NULL
                    ELSE transaction_id IS NULL AND accrual_key IS NOT NULL END))
ORDER BY exact DESC, transaction_id IS NULL, id
"""

# The accrual's entry learns what the event adds: its transaction's own figures and time
# replace the rewarded event's (which has no transaction time: its webhook's).
MERGE_ACCRUAL = f"""
UPDATE ledger_entries l SET
    transaction_id = COALESCE(l.transaction_id, %(transaction_id)s),
    accrual_key = COALESCE(l.accrual_key, %(accrual_key)s),
    amount = CASE WHEN %(transaction_id)s::text IS NOT NULL THEN %(amount)s ELSE l.amount END,
    moved_at = CASE WHEN %(transaction_id)s::text IS NOT NULL
                    THEN COALESCE(%(moved_at)s, l.moved_at) ELSE l.moved_at END,{_BALANCE_SET},
    customer_id = COALESCE(l.customer_id, %(customer_id)s),
    voucher_code = COALESCE(l.voucher_code, %(voucher_code)s),
    updated_at = now()
WHERE id = %(id)s
"""  # noqa: S608 - constant fragments only, no input

DELETE_ENTRY = "DELETE FROM ledger_entries WHERE id = %(id)s"

# The card's balance as of its newest report, and its holder as of that report; heard_at
# is when any event of the card last reached us (the drift job waits for quiet cards). An
# event without a balance (``%(balance)s`` / ``%(at)s`` NULL) still makes the card's row:
# unmeasured until a report comes (migrations/0012_unmeasured_cards.sql).
UPSERT_CARD_BALANCE = """
INSERT INTO card_balances AS c (voucher_id, voucher_code, kind, customer_id,
                                reported_balance, reported_at)
VALUES (%(voucher_id)s, %(voucher_code)s, %(kind)s, %(customer_id)s, %(balance)s, %(at)s)
ON CONFLICT (voucher_id) DO UPDATE SET
    reported_balance = CASE WHEN EXCLUDED.reported_at IS NOT NULL
                                 AND (c.reported_at IS NULL
                                      OR EXCLUDED.reported_at > c.reported_at)
                            THEN EXCLUDED.reported_balance ELSE c.reported_balance END,
    reported_at = GREATEST(c.reported_at, EXCLUDED.reported_at),
    customer_id = CASE WHEN EXCLUDED.customer_id IS NOT NULL
                            AND (c.customer_id IS NULL
                                 OR EXCLUDED.reported_at >= c.reported_at
                                 OR c.reported_at IS NULL)
                       THEN EXCLUDED.customer_id ELSE c.customer_id END,
    voucher_code = COALESCE(c.voucher_code, EXCLUDED.voucher_code),
    heard_at = now(),
    updated_at = now()
"""

# The ledger belongs to the card: its entries follow the card's holder as last reported.
SYNC_HOLDER = """
UPDATE ledger_entries l SET customer_id = c.customer_id, updated_at = now()
FROM card_balances c
WHERE c.voucher_id = %(voucher_id)s AND l.voucher_id = c.voucher_id
  AND c.customer_id IS NOT NULL AND l.customer_id IS DISTINCT FROM c.customer_id
"""

# A failed rollback's flag; born resolved (``resolved_note``) when our record shows a
# rollback that succeeded already (migrations/0009_flag_endings.sql does it the other way).
INSERT_ROLLBACK_FLAG = """
INSERT INTO flags (category, redemption_id, rollback_id, voucher_id, failure_code,
                   failure_message, event_id, status, note, resolved_at)
VALUES (%(category)s, %(redemption_id)s, %(rollback_id)s, %(voucher_id)s, %(failure_code)s,
        %(failure_message)s, %(event_id)s,
        CASE WHEN %(resolved_note)s::text IS NULL THEN 'open' ELSE 'resolved' END,
        %(resolved_note)s, CASE WHEN %(resolved_note)s::text IS NOT NULL THEN now() END)
ON CONFLICT (rollback_id) WHERE rollback_id IS NOT NULL DO NOTHING
"""

TOUCH_REDEMPTION = """
UPDATE redemptions SET last_event_at = GREATEST(last_event_at, %(at)s), updated_at = now()
WHERE redemption_id = %(redemption_id)s
"""

# Our record of a redemption, for a failed rollback: its status, its last rollback, and
# whether the card's restore is in the ledger (from the rollback or a refund transaction).
OUR_ROLLBACK = """
SELECT r.status, r.rollback_id,
       EXISTS (SELECT 1 FROM ledger_entries l
               WHERE l.redemption_id = %(redemption_id)s AND l.effect = %(restore)s) AS restored
FROM (SELECT %(redemption_id)s::text AS redemption_id) k
LEFT JOIN redemptions r ON r.redemption_id = k.redemption_id
"""

# --- stacks (migrations/0010_stacks.sql) ---------------------------------------------

# A rolled-back parent rolls back every child we know: each child becomes ROLLED_BACK (its
# own rollback id stays for its own rollback webhook to fill) and its card's restore
# mirrors its debit, under the same key as the child's own rollback webhook
# (redemption_id, effect): whichever comes first, once. Run after a parent's rollback and
# after a child's redemption (a child heard of after its parent's rollback).
ROLL_BACK_CHILDREN = """
WITH parent AS (
    SELECT redemption_id, rollback_at, rollback_reason, last_event_at FROM redemptions
    WHERE redemption_id = %(parent_id)s AND status = %(rolled_back)s
), children AS (
    UPDATE redemptions c
    SET status = %(rolled_back)s,
        rollback_at = COALESCE(c.rollback_at, p.rollback_at),
        rollback_reason = COALESCE(c.rollback_reason, p.rollback_reason),
        updated_at = now()
    FROM parent p
    WHERE c.parent_redemption_id = p.redemption_id AND c.status = %(succeeded)s
    RETURNING c.redemption_id
)
INSERT INTO ledger_entries (customer_id, redeemer_id, voucher_id, voucher_code, kind, amount,
                            redemption_id, effect, reason, event_id, moved_at)
SELECT d.customer_id, d.redeemer_id, d.voucher_id, d.voucher_code, d.kind, -d.amount,
       d.redemption_id, %(restore)s, COALESCE(p.rollback_reason, 'rollback'), %(event_id)s,
       COALESCE(p.rollback_at, p.last_event_at, now())
FROM parent p
JOIN redemptions c ON c.parent_redemption_id = p.redemption_id
JOIN ledger_entries d ON d.redemption_id = c.redemption_id AND d.effect = %(debit)s
ON CONFLICT (redemption_id, effect) DO NOTHING
"""

# A card transaction may name the stack's parent rather than the child that moved the
# card: its entry belongs to the child of that parent on the same card.
CHILD_ON_CARD = """
SELECT redemption_id FROM redemptions
WHERE parent_redemption_id = %(redemption_id)s AND voucher_id = %(voucher_id)s
ORDER BY redemption_id LIMIT 1
"""

# Whether the redemption a card transaction names is a stack's parent: children name it,
# it has no card or another card (a redemption moves its own card only), or another
# card's transaction named it already.
NAMES_A_PARENT = """
SELECT EXISTS (SELECT 1 FROM redemptions
               WHERE parent_redemption_id = %(redemption_id)s
                  OR (redemption_id = %(redemption_id)s
                      AND voucher_id IS DISTINCT FROM %(voucher_id)s))
    OR EXISTS (SELECT 1 FROM ledger_entries
               WHERE redemption_id = %(redemption_id)s
                 AND voucher_id IS DISTINCT FROM %(voucher_id)s)
"""

# A parent has no card entries of its own: those its transactions made keyed by it (when
# nothing told yet that it is a parent) wait for their children
# (migrations/0015_stack_waiting_entries.sql).
PARENT_ENTRIES_WAIT = """
UPDATE ledger_entries
SET stack_parent_id = redemption_id, redemption_id = NULL, updated_at = now()
WHERE redemption_id = %(redemption_id)s AND transaction_id IS NOT NULL
"""

# A transaction naming a parent, its child on the card not yet known: the entry waits,
# keyed by its transaction. Its figures are the transaction's own.
UPSERT_WAITING_MOVEMENT = """
INSERT INTO ledger_entries AS l (customer_id, voucher_id, voucher_code, kind, amount,
                                 stack_parent_id, effect, reason, event_id, moved_at,
                                 balance_after, transaction_id)
VALUES (%(customer_id)s, %(voucher_id)s, %(voucher_code)s, %(kind)s, %(amount)s,
        %(parent_id)s, %(effect)s, %(reason)s, %(event_id)s, COALESCE(%(moved_at)s, now()),
        %(balance_after)s, %(transaction_id)s)
ON CONFLICT (transaction_id) DO UPDATE SET
    amount = EXCLUDED.amount,
    moved_at = EXCLUDED.moved_at,
    balance_after = COALESCE(EXCLUDED.balance_after, l.balance_after),
    customer_id = COALESCE(l.customer_id, EXCLUDED.customer_id),
    voucher_code = COALESCE(l.voucher_code, EXCLUDED.voucher_code),
    updated_at = now()
"""

# The child heard of: what waits for it on its card (and what a transaction keyed by its
# parent before anything told the parent was one) becomes its entry, one of each effect,
# unless it has that entry already. Its own debit and restore are those entries, not
# second ones.
TAKE_WAITING_ENTRIES = """
UPDATE ledger_entries l
SET redemption_id = %(redemption_id)s, stack_parent_id = NULL, updated_at = now()
WHERE l.id IN (
    SELECT DISTINCT ON (w.effect) w.id FROM ledger_entries w
    WHERE (w.stack_parent_id = %(parent_id)s OR w.redemption_id = %(parent_id)s)
      AND w.voucher_id = %(voucher_id)s AND w.effect <> %(movement)s
      AND NOT EXISTS (SELECT 1 FROM ledger_entries o
                      WHERE o.redemption_id = %(redemption_id)s AND o.effect = w.effect)
    ORDER BY w.effect, w.moved_at, w.id)
"""
