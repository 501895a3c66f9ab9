-- The ledger becomes the card's: every movement of a gift card's credit or a loyalty
-- card's points, once, keyed by Voucherify's transaction id, attributed to the card's
-- holder, with the movement's own time and the balance after it (what the drift job
-- measures from). See docs/reconciliation.md, "Balance drift".

-- customer_id now names the card's HOLDER (whom the entry is attributed to); the customer
-- who redeemed is kept beside it.
ALTER TABLE ledger_entries
    ADD COLUMN redeemer_id    text,
    ADD COLUMN transaction_id text UNIQUE,   -- Voucherify's vtx_...; NULL until known
    ADD COLUMN moved_at       timestamptz,   -- when the movement happened (Voucherify's time)
    ADD COLUMN balance_after  bigint,        -- the card's balance right after it, if reported
    ADD COLUMN updated_at     timestamptz NOT NULL DEFAULT now(),
    ALTER COLUMN redemption_id DROP NOT NULL;

-- Existing rows were attributed to the redeemer: that is who redeemed. Their holder is
-- the one the entry's own event named, where its payload is still kept and names one;
-- otherwise the redeemer stays (the best guess there is: most cards are redeemed by their
-- holder), until a later event of the card names its holder.
UPDATE ledger_entries l SET redeemer_id = l.customer_id;
UPDATE ledger_entries l
SET customer_id = COALESCE(e.payload #>> '{data,voucher,holder_id}',
                           e.payload #>> '{data,redemption,voucher,holder_id}',
                           l.customer_id)
FROM events e
WHERE e.event_id = l.event_id;

-- The movement's time for existing rows: the redemption's or the rollback's date, as the
-- old drift check used. Their balance after is unknown (NULL): the drift job measures a
-- card from its first movement that reports one, so existing cards are measured from
-- their first movement after this migration (their older history missed top-ups,
-- accruals and expiries, which the old ledger never recorded).
UPDATE ledger_entries l
SET moved_at = COALESCE(CASE l.effect WHEN 'debit' THEN r.redeemed_at ELSE r.rollback_at END,
                        l.created_at)
FROM redemptions r
WHERE r.redemption_id = l.redemption_id;
UPDATE ledger_entries SET moved_at = created_at WHERE moved_at IS NULL;
ALTER TABLE ledger_entries ALTER COLUMN moved_at SET NOT NULL;

-- A movement of no redemption ('movement') has a transaction id and no redemption; a
-- debit or restore has its redemption.
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_effect_check;
ALTER TABLE ledger_entries
    ADD CONSTRAINT ledger_entries_effect_check
        CHECK (effect IN ('debit', 'restore', 'movement')),
    ADD CONSTRAINT ledger_entries_keyed
        CHECK (CASE WHEN effect = 'movement' THEN transaction_id IS NOT NULL AND redemption_id IS NULL
                    ELSE redemption_id IS NOT NULL END);

DROP INDEX ledger_entries_customer;
CREATE INDEX ledger_entries_holder ON ledger_entries (customer_id, kind);
DROP INDEX ledger_entries_voucher;
-- The drift job walks a card's movements in their order.
CREATE INDEX ledger_entries_card_moves ON ledger_entries (voucher_id, moved_at, id);

-- card_balances: the card, its holder, its last report, and when we last heard of it
-- (the drift job checks a card once it has been quiet for a while). customer_id names
-- the holder here too.
ALTER TABLE card_balances
    ADD COLUMN heard_at       timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN accepted_drift bigint NOT NULL DEFAULT 0,
    ADD COLUMN accepted_at    timestamptz NOT NULL DEFAULT now();
UPDATE card_balances SET heard_at = updated_at;
CREATE INDEX card_balances_heard_at ON card_balances (heard_at);

-- The baselines of 0003 are replaced by the measure from the first movement and the
-- difference a person accepted (accepted_drift).
DROP TRIGGER card_balances_baseline ON card_balances;
DROP FUNCTION card_balances_baseline();
ALTER TABLE card_balances
    DROP COLUMN baseline_balance,
    DROP COLUMN baseline_at,
    DROP COLUMN baseline_set_at;
