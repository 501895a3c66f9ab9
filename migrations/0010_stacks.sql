-- Stacked redemptions (POST /v1/redemptions with several redeemables): a parent and one
-- child per redeemable, each child naming the parent (redemptions.parent_redemption_id).
-- Rolling back the parent rolls back every child (Voucherify's stacking docs): the
-- handlers find a parent's children through this index.
CREATE INDEX redemptions_parent ON redemptions (parent_redemption_id)
    WHERE parent_redemption_id IS NOT NULL;
