"""The inbox's SQL (events, deliveries, dead letters), kept together as the handlers' is
(``workers.handlers.sql``); ``workers.processing`` runs it. ``%(name)s`` parameters only."""

CLAIM_EVENT = """
INSERT INTO events AS e (event_id, type, payload, raw_body, event_created_at, received_at)
VALUES (%(event_id)s, %(type)s, %(payload)s::jsonb, %(raw_body)s, %(event_created_at)s,
        %(received_at)s)
ON CONFLICT (event_id) DO UPDATE SET updated_at = now()  -- takes the row lock
RETURNING status
"""

FINISH_EVENT = """
WITH finished AS (
    UPDATE events
    SET status = %(status)s,
        attempts = attempts + 1,
        processed_at = CASE WHEN %(settled)s THEN now() END,
        last_error = %(error)s,
        updated_at = now()
    WHERE event_id = %(event_id)s
)
INSERT INTO deliveries (delivery_id, event_id, received_at, outcome)
VALUES (%(delivery_id)s, %(event_id)s, %(received_at)s, %(outcome)s)
ON CONFLICT (delivery_id) DO UPDATE SET outcome = EXCLUDED.outcome
"""

RECORD_DUPLICATE = """
INSERT INTO deliveries (delivery_id, event_id, received_at, outcome)
VALUES (%(delivery_id)s, %(event_id)s, %(received_at)s, %(outcome)s)
ON CONFLICT (delivery_id) DO NOTHING
"""

INSERT_DEAD_LETTER = """
INSERT INTO dead_letters (event_id, delivery_id, type, reason)
VALUES (%(event_id)s, %(delivery_id)s, %(type)s, %(reason)s)
"""

# An event already final is not touched (the WHERE of the upsert): its delivery is then a
# duplicate, as when the worker's own claim finds it final.
RECORD_FAILURE = """
WITH failed AS (
    INSERT INTO events AS e (event_id, type, payload, raw_body, event_created_at, received_at,
                             status, attempts, last_error)
    VALUES (%(event_id)s, %(type)s, %(payload)s::jsonb, %(raw_body)s, %(event_created_at)s,
            %(received_at)s, %(status)s, 1, %(error)s)
    ON CONFLICT (event_id) DO UPDATE
    SET status = %(status)s, attempts = e.attempts + 1, last_error = EXCLUDED.last_error,
        updated_at = now()
    WHERE e.status = ANY(%(unfinished)s)
    RETURNING e.event_id
)
INSERT INTO deliveries (delivery_id, event_id, received_at, outcome)
SELECT %(delivery_id)s::text, %(event_id)s::text, %(received_at)s::timestamptz,
       CASE WHEN EXISTS (SELECT FROM failed) THEN %(outcome)s ELSE %(duplicate)s END
ON CONFLICT (delivery_id) DO NOTHING
"""
