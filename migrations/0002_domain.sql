-- Our records of Voucherify's orders, redemptions and card balances, the ledger of gift
-- credit and loyalty points, and the flags a person must look at.
-- State moves forward only: every transition is an UPDATE ... WHERE it is allowed.

CREATE TABLE orders (
    order_id     text PRIMARY KEY,
    status       text CHECK (status IN ('CREATED', 'PAID', 'FULFILLED', 'CANCELED')),
    amount       bigint,
    total_amount bigint,
    customer_id  text,
    source_updated_at timestamptz,     -- the order's own updated_at (else the event's date)
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_customer_id ON orders (customer_id);

CREATE TABLE redemptions (
    redemption_id   text PRIMARY KEY,
    status          text NOT NULL CHECK (status IN ('SUCCEEDED', 'FAILED', 'ROLLED_BACK')),
    parent_redemption_id text,          -- stacked redemptions: the stack's redemption
    order_id        text,
    customer_id     text,
    voucher_id      text,
    voucher_code    text,
    voucher_type    text,
    amount          bigint,
    redeemed_at     timestamptz,
    failure_code    text,
    failure_message text,
    rollback_id     text,
    rollback_at     timestamptz,
    rollback_reason text,
    last_event_at   timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX redemptions_order_id ON redemptions (order_id);
CREATE INDEX redemptions_customer_id ON redemptions (customer_id);
CREATE INDEX redemptions_unsettled ON redemptions (last_event_at) WHERE status = 'SUCCEEDED';

CREATE TABLE ledger_entries (
    id            bigserial PRIMARY KEY,
    customer_id   text,
    voucher_id    text,
    voucher_code  text,
    kind          text NOT NULL CHECK (kind IN ('gift_credit', 'loyalty_points')),
    amount        bigint NOT NULL CHECK (amount <> 0),   -- + credit, - debit
    redemption_id text NOT NULL,
    effect        text NOT NULL CHECK (effect IN ('debit', 'restore')),
    reason        text NOT NULL,
    event_id      text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- One debit and one restore per redemption, whatever the deliveries.
    UNIQUE (redemption_id, effect)
);
CREATE INDEX ledger_entries_customer ON ledger_entries (customer_id, kind);
CREATE INDEX ledger_entries_voucher ON ledger_entries (voucher_id);

-- The last balance Voucherify reported for a card, for the drift check.
CREATE TABLE card_balances (
    voucher_id       text PRIMARY KEY,
    voucher_code     text,
    kind             text NOT NULL CHECK (kind IN ('gift_credit', 'loyalty_points')),
    customer_id      text,
    reported_balance bigint NOT NULL,
    reported_at      timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE flags (
    id              bigserial PRIMARY KEY,
    category        text NOT NULL CHECK (category IN ('already_rolled_back', 'review', 'drift')),
    redemption_id   text,
    rollback_id     text,
    voucher_id      text,
    failure_code    text,
    failure_message text,
    event_id        text,
    status          text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'resolved')),
    note            text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    resolved_at     timestamptz
);
-- One flag per failed rollback; one open drift flag per card.
CREATE UNIQUE INDEX flags_rollback_id ON flags (rollback_id) WHERE rollback_id IS NOT NULL;
CREATE UNIQUE INDEX flags_open_drift ON flags (voucher_id) WHERE category = 'drift' AND status = 'open';
CREATE INDEX flags_status ON flags (status, id);

-- The allowed moves of an order and of a redemption. A status never goes back: a late
-- redemption.succeeded cannot turn a ROLLED_BACK redemption or a CANCELED order back.
CREATE TABLE order_transitions (
    from_status text NOT NULL,
    to_status   text NOT NULL,
    PRIMARY KEY (from_status, to_status)
);
INSERT INTO order_transitions VALUES
    ('CREATED', 'PAID'), ('CREATED', 'FULFILLED'), ('CREATED', 'CANCELED'),
    ('PAID', 'FULFILLED'), ('PAID', 'CANCELED'),
    ('FULFILLED', 'CANCELED');

CREATE TABLE redemption_transitions (
    from_status text NOT NULL,
    to_status   text NOT NULL,
    PRIMARY KEY (from_status, to_status)
);
INSERT INTO redemption_transitions VALUES ('SUCCEEDED', 'ROLLED_BACK');
