-- A healed movement lands on its holder (issue 23; docs/reconciliation.md, "Balance
-- drift"): verify heals lost redemptions from Voucherify's listing, whose voucher names no
-- holder, so their entries had nobody's customer_id. The drift job asks Voucherify for
-- such a card (GET /v1/vouchers/{id}) and moves its entries to the holder it names.
--
-- looked_up_at: when the card was asked (NULL: never). Set whatever the answer -- no
-- holder (common for gift cards) or an unknown card (404) -- so each card costs one call,
-- ever, of a budget the shop's checkout shares.
-- lookup_failures: the calls for it that failed; a card is not asked again after a few, so
-- one that always fails cannot spend a share of every run.
ALTER TABLE card_balances
    ADD COLUMN looked_up_at    timestamptz,
    ADD COLUMN lookup_failures integer NOT NULL DEFAULT 0;

-- The cards still to ask, fewest failures first: a small index of the few cards without
-- a holder, not a scan of every card each run.
CREATE INDEX card_balances_to_look_up ON card_balances (lookup_failures, voucher_id)
    WHERE customer_id IS NULL AND looked_up_at IS NULL;
