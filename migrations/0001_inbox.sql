-- The inbox: every event once (keyed by event.id, else the envelope id), every delivery
-- of it, and the dead letters. Correctness lives in the keys: a second row for the same
-- event or the same delivery cannot exist.

CREATE TABLE events (
    event_id         text PRIMARY KEY,
    type             text NOT NULL,
    status           text NOT NULL DEFAULT 'received'
                     CHECK (status IN ('received', 'processed', 'ignored', 'failed', 'dead')),
    payload          jsonb,            -- the raw body; NULL once pruned by retention
    event_created_at timestamptz,
    received_at      timestamptz NOT NULL,   -- when the first delivery reached the receiver
    processed_at     timestamptz,
    attempts         integer NOT NULL DEFAULT 0,
    redrives         integer NOT NULL DEFAULT 0,
    last_error       text,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
-- What the re-drive job scans: events whose processing has not finished.
CREATE INDEX events_unfinished ON events (updated_at) WHERE status IN ('received', 'failed');
CREATE INDEX events_received_at ON events (received_at);
CREATE INDEX events_status_type ON events (status, type);

CREATE TABLE deliveries (
    delivery_id text PRIMARY KEY,
    event_id    text NOT NULL REFERENCES events (event_id) ON DELETE CASCADE,
    received_at timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    outcome     text NOT NULL DEFAULT 'received'
                CHECK (outcome IN ('received', 'processed', 'duplicate', 'ignored', 'failed', 'dead'))
);
CREATE INDEX deliveries_event_id ON deliveries (event_id);
CREATE INDEX deliveries_received_at ON deliveries (received_at);

CREATE TABLE dead_letters (
    id          bigserial PRIMARY KEY,
    event_id    text NOT NULL REFERENCES events (event_id) ON DELETE CASCADE,
    delivery_id text,
    type        text NOT NULL,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    replayed_at timestamptz
);
CREATE INDEX dead_letters_open ON dead_letters (id) WHERE replayed_at IS NULL;
CREATE INDEX dead_letters_type ON dead_letters (type, id);
