-- What the reconciliation jobs (workers/jobs/) need: a record of their runs, when a
-- redemption or a flag was last checked against Voucherify's API, and the balance each
-- card's drift is measured from. See docs/reconciliation.md.

-- One row per job run (and per run skipped because another held the job's lock).
-- started_at / finished_at come from the database clock, so runs of different processes
-- and hosts compare on one clock.
CREATE TABLE job_runs (
    id          bigserial PRIMARY KEY,
    job         text NOT NULL,
    outcome     text NOT NULL DEFAULT 'running'
                CHECK (outcome IN ('running', 'succeeded', 'failed', 'skipped')),
    started_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz,
    result      jsonb,
    error       text,
    runner      text                    -- host:pid of the process that ran it
);
CREATE INDEX job_runs_job ON job_runs (job, started_at);

-- The verify job: when Voucherify's API last confirmed (or corrected) our record.
ALTER TABLE redemptions ADD COLUMN verified_at timestamptz;
CREATE INDEX redemptions_verify ON redemptions (verified_at NULLS FIRST, last_event_at)
    WHERE status IN ('SUCCEEDED', 'ROLLED_BACK');
ALTER TABLE flags ADD COLUMN verified_at timestamptz;
-- One open flag per redemption that the verify job found at odds with Voucherify and
-- could not heal.
CREATE UNIQUE INDEX flags_open_verify_mismatch ON flags (redemption_id)
    WHERE failure_code = 'verify_mismatch' AND status = 'open';

-- The drift job measures a card from its baseline: the first balance Voucherify reported
-- to us for it (moved to the then-current report when a person resolves a drift flag).
ALTER TABLE card_balances
    ADD COLUMN baseline_balance bigint,
    ADD COLUMN baseline_at      timestamptz,
    ADD COLUMN baseline_set_at  timestamptz;
UPDATE card_balances
SET baseline_balance = reported_balance, baseline_at = reported_at, baseline_set_at = now();
ALTER TABLE card_balances
    ALTER COLUMN baseline_balance SET NOT NULL,
    ALTER COLUMN baseline_at SET NOT NULL,
    ALTER COLUMN baseline_set_at SET NOT NULL,
    ALTER COLUMN baseline_set_at SET DEFAULT now();

-- The first report of a card is its baseline; the handlers' upsert does not know about
-- baselines, so a trigger fills them in on insert (an update never touches them).
CREATE FUNCTION card_balances_baseline() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.baseline_balance := COALESCE(NEW.baseline_balance, NEW.reported_balance);
    NEW.baseline_at := COALESCE(NEW.baseline_at, NEW.reported_at);
    RETURN NEW;
END
$$;
CREATE TRIGGER card_balances_baseline BEFORE INSERT ON card_balances
    FOR EACH ROW EXECUTE FUNCTION card_balances_baseline();

-- The retention job deletes events by when they were last seen.
CREATE INDEX events_updated_at ON events (updated_at);
