-- What a person asked to be done about a flag through Voucherify's API (issue 24;
-- workers/jobs/flag_actions.py): recorded before its call, so that a call whose answer
-- was lost (a timeout, a crash of the process between the call and its record) is looked
-- up at Voucherify before anything is sent again.
CREATE TABLE flag_actions (
    id            bigserial PRIMARY KEY,
    flag_id       bigint NOT NULL REFERENCES flags (id),
    kind          text NOT NULL CHECK (kind IN ('compensate', 'retry', 'settle')),
    state         text NOT NULL DEFAULT 'pending'
                  CHECK (state IN ('pending', 'succeeded', 'failed', 'unknown')),
    requested_by  text NOT NULL,
    redemption_id text NOT NULL,
    -- What is sent: the calls (method, path, query, body) and, for a compensation, the
    -- cards and amounts taken from our ledger (never typed by hand).
    request       jsonb NOT NULL,
    result        jsonb,
    error         text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    CHECK ((finished_at IS NULL) = (state = 'pending' OR state = 'unknown'))
);
-- One open action per flag: a second, while one is pending or its outcome unknown, is
-- refused (the web's 409), whatever process asks.
CREATE UNIQUE INDEX flag_actions_one_open ON flag_actions (flag_id)
    WHERE state IN ('pending', 'unknown');
CREATE INDEX flag_actions_of_flag ON flag_actions (flag_id, id);
