-- Earning-rule accruals (customer.rewarded.loyalty_points) name no transaction: they are
-- keyed by the card, the earning rule and the order (or, without an order, the event that
-- triggered the rule), the key their POINTS_ACCRUAL transaction's details give too. So the
-- accrual and its transaction are one entry, whichever arrives first (see
-- workers/handlers/cards.py). A movement is keyed by its transaction, its accrual, or both.
ALTER TABLE ledger_entries
    ADD COLUMN accrual_key text UNIQUE,
    -- The balance after the movement was read from the card's snapshot in the event's
    -- voucher, not reported by the movement itself: a later report of the movement's own
    -- (its transaction's) replaces it, never the other way round. (A redemption's entry
    -- takes its transaction's figures whenever they come: UPSERT_REDEMPTION_MOVEMENT.)
    ADD COLUMN balance_from_snapshot boolean NOT NULL DEFAULT false,
    DROP CONSTRAINT ledger_entries_keyed,
    ADD CONSTRAINT ledger_entries_keyed
        CHECK (CASE WHEN effect = 'movement'
                    THEN (transaction_id IS NOT NULL OR accrual_key IS NOT NULL)
                         AND redemption_id IS NULL
                    ELSE redemption_id IS NOT NULL END);

