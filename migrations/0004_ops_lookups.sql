-- Lookups for the operators ("what happened to redemption X", "the events of order Y"):
-- the events that carry a redemption or an order, found by id without scanning payloads.
-- Small btree expression indexes; NULL for other event types and once a payload is pruned.

CREATE INDEX events_redemption_id ON events ((payload #>> '{data,redemption,id}'));
CREATE INDEX events_order_id ON events ((payload #>> '{data,order,id}'));
