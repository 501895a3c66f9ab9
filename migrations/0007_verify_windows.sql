-- The verify job lists Voucherify's redemptions by creation time instead of polling each
-- one (docs/reconciliation.md, "Verify against Voucherify"): a watermark says how far the
-- listing has got, a budget counts the calls every job makes to Voucherify's API, and a
-- failed rollback that hides a lost rollback gets a flag category of its own.

-- How far the listing of GET /v1/redemptions has got: everything Voucherify created before
-- swept_to has been listed and compared at least once. Each run lists again from
-- swept_to minus an overlap, for what Voucherify's listing showed late.
CREATE TABLE verify_watermarks (
    name       text PRIMARY KEY,
    swept_to   timestamptz NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Calls made to Voucherify's API, per UTC minute and per UTC day, by every process: the
-- budget (VOUCHERIFY_API_CALLS_PER_MINUTE / _PER_DAY) is checked and taken in one
-- statement, so two jobs running at once share it. Rows older than two days are deleted
-- by the job that writes them.
CREATE TABLE voucherify_api_calls (
    period     text NOT NULL,                -- 'minute' or 'day'
    starts_at  timestamptz NOT NULL,
    calls      integer NOT NULL,
    PRIMARY KEY (period, starts_at)
);

-- A redemption.rollback.failed "already_rolled_back" whose payload shows the redemption
-- ROLLED_BACK while our record is not: the successful rollback's webhook was lost, and
-- the restore is missing from our books.
ALTER TABLE flags DROP CONSTRAINT flags_category_check;
ALTER TABLE flags ADD CONSTRAINT flags_category_check
    CHECK (category IN ('already_rolled_back', 'review', 'drift', 'lost_rollback'));
CREATE INDEX flags_open_lost_rollback ON flags (redemption_id)
    WHERE category = 'lost_rollback' AND status = 'open';

-- The lost rollback's webhook may still arrive (Voucherify retries for days), or the verify
-- job applies the rollback: whichever moves our record to ROLLED_BACK ends the lost
-- rollback, in the same transaction as the restore the rollback handler applies with it.
-- The flag becomes what the webhooks in their natural order would have left (rollback,
-- then the failed attempt): an open already_rolled_back flag, with a note saying so, that
-- the verify job (or a person) resolves like any other. So any order of the same webhooks
-- ends in the same rows.
CREATE FUNCTION flags_end_lost_rollback() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE flags
    SET category = 'already_rolled_back',
        note = 'the rollback is in our records since '
               || to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
               || ' (rollback ' || COALESCE(NEW.rollback_id, 'unknown')
               || '): the restore is no longer missing'
    WHERE redemption_id = NEW.redemption_id AND category = 'lost_rollback' AND status = 'open';
    RETURN NULL;
END
$$;
CREATE TRIGGER redemptions_lost_rollback_ended
    AFTER INSERT OR UPDATE OF status ON redemptions
    FOR EACH ROW WHEN (NEW.status = 'ROLLED_BACK')
    EXECUTE FUNCTION flags_end_lost_rollback();
