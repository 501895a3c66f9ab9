-- A budget that cannot starve the healing (issue 23; docs/reconciliation.md, "The API
-- budget"):
--
-- Each open flag and each drifting card gets a next-check time with exponential back-off
-- and a failure count: a check that leaves it as it was, or a call that failed, waits
-- twice as long before the next one, so a few that never settle cannot spend the day.
ALTER TABLE flags
    ADD COLUMN next_check_at  timestamptz,
    ADD COLUMN check_failures integer NOT NULL DEFAULT 0;
CREATE INDEX flags_next_check ON flags (next_check_at NULLS FIRST, id) WHERE status = 'open';

ALTER TABLE card_balances
    ADD COLUMN heal_next_at  timestamptz,
    ADD COLUMN heal_failures integer NOT NULL DEFAULT 0;

-- The pace of calls to Voucherify's API, shared by every process: the next free slot
-- (calls are spaced 60 / VOUCHERIFY_API_CALLS_PER_MINUTE seconds apart, so any 60 s holds
-- at most the per-minute cap: a sliding window, not fixed minute buckets) and the pause
-- Voucherify's X-Rate-Limit-* headers asked for. One row, locked by each call's take.
CREATE TABLE voucherify_api_pace (
    name         text PRIMARY KEY,
    next_slot    double precision NOT NULL,  -- Unix time, seconds
    paused_until double precision            -- Unix time, seconds
);
