-- Orders follow Voucherify's order events (customer.order.created / paid / updated /
-- canceled) and the order inside every redemption and rollback event: the row holds the
-- order's latest change by the order's own updated_at, whatever the arrival order.
-- Voucherify has no state machine for orders (PUT /v1/orders/{id} sets any status), so
-- the forward-only transition table goes.
--
-- status_at: the updated_at of the change the row's status comes from (else the order's
-- created_at, else the event's date). A change wins when it is newer; at the same instant
-- the later status in CREATED < PAID < FULFILLED < CANCELED wins, so every arrival order
-- ends in the same row. last_event_id / last_event_type: the event of that change.
ALTER TABLE orders
    ADD COLUMN status_at       timestamptz,
    ADD COLUMN last_event_id   text,
    ADD COLUMN last_event_type text;
UPDATE orders SET status_at = source_updated_at WHERE status IS NOT NULL;

DROP TABLE order_transitions;

CREATE FUNCTION order_status_rank(status text) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT array_position(ARRAY['CREATED', 'PAID', 'FULFILLED', 'CANCELED'], status) $$;

-- Whether a change (new_status at new_at) wins over the row's (old_status at old_at): the
-- one rule of workers/handlers/sql.py UPSERT_ORDER. A change without a status never wins;
-- one without a date wins only over a row without a status or with an older rank.
CREATE FUNCTION order_change_wins(new_status text, new_at timestamptz,
                                  old_status text, old_at timestamptz) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT new_status IS NOT NULL AND (old_status IS NULL
        OR (COALESCE(new_at, '-infinity'), order_status_rank(new_status))
         > (COALESCE(old_at, '-infinity'), order_status_rank(old_status))) $$;
