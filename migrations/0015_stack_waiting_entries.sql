-- A stack's card transaction may name the stack's parent rather than the child that moved
-- the card (issue 23; workers/handlers/cards.py). Before that child is known, such an entry
-- cannot be keyed (redemption_id, effect) by the parent: a stack moves several cards, so
-- two cards' transactions would be one entry, and the parent's own webhooks would take
-- them for the parent's. It waits instead, keyed by its transaction, naming the parent in
-- stack_parent_id, until the child on its card is heard of and takes it (one of each
-- effect): then it is the child's (redemption_id, effect) entry like any other.
ALTER TABLE ledger_entries
    ADD COLUMN stack_parent_id text,
    DROP CONSTRAINT ledger_entries_keyed,
    ADD CONSTRAINT ledger_entries_keyed
        CHECK (CASE WHEN effect = 'movement'
                    THEN (transaction_id IS NOT NULL OR accrual_key IS NOT NULL)
                         AND redemption_id IS NULL AND stack_parent_id IS NULL
                    WHEN redemption_id IS NULL
                    THEN stack_parent_id IS NOT NULL AND transaction_id IS NOT NULL
                    ELSE stack_parent_id IS NULL END);

-- A child takes what waits for it on its card.
CREATE INDEX ledger_entries_waiting ON ledger_entries (stack_parent_id, voucher_id)
    WHERE stack_parent_id IS NOT NULL;

-- Entries the old handlers keyed by a parent (a transaction naming a parent whose child
-- on that card was not yet known): the ones of a redemption we know to be a stack's
-- parent (children name it, or it has no card of this entry's) wait for their child...
UPDATE ledger_entries l
SET stack_parent_id = l.redemption_id, redemption_id = NULL, updated_at = now()
WHERE l.transaction_id IS NOT NULL AND l.effect <> 'movement'
  AND (EXISTS (SELECT 1 FROM redemptions c WHERE c.parent_redemption_id = l.redemption_id)
       OR EXISTS (SELECT 1 FROM redemptions p
                  WHERE p.redemption_id = l.redemption_id
                    AND p.voucher_id IS DISTINCT FROM l.voucher_id));

-- ... and a child on the card already known, without that entry, takes it now.
UPDATE ledger_entries l
SET redemption_id = w.child_id, stack_parent_id = NULL, updated_at = now()
FROM (SELECT DISTINCT ON (c.redemption_id, e.effect) e.id, c.redemption_id AS child_id
      FROM ledger_entries e
      JOIN LATERAL (SELECT redemption_id FROM redemptions
                    WHERE parent_redemption_id = e.stack_parent_id
                      AND voucher_id = e.voucher_id
                    ORDER BY redemption_id LIMIT 1) c ON true
      WHERE e.stack_parent_id IS NOT NULL
        AND NOT EXISTS (SELECT 1 FROM ledger_entries o
                        WHERE o.redemption_id = c.redemption_id AND o.effect = e.effect)
      ORDER BY c.redemption_id, e.effect, e.moved_at, e.id) w
WHERE l.id = w.id;
-- Entries without a transaction keyed by a parent (a parent's late redemption webhook
-- mirrored such a debit into a restore) stay as they are: the drift job measures every
-- card from its movements, and shows a card they put off.
