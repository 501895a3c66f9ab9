"""All the SQL the ops API, the dashboard and the CLI run, kept together and written out.

Named queries with ``%(name)s`` parameters (the statuses too: their words come from
``schemas.vocabulary``), never string formatting; ``ops.store`` runs them, one small
function per question, and reads the rows by column name. Lists are keyset-paginated:
they fetch ``limit + 1`` rows and the extra one means there is a next page.
"""

# --- events ---------------------------------------------------------------------------

EVENT = """
SELECT event_id, type, status, attempts, last_error, received_at, processed_at,
       event_created_at, updated_at, redrives,
       (payload IS NOT NULL OR raw_body IS NOT NULL) AS has_payload,
       payload #>> '{data,redemption,id}' AS redemption_id,
       payload #>> '{data,order,id}' AS order_id,
       payload #>> '{data,customer,id}' AS customer_id
FROM events
WHERE event_id = %(event_id)s
"""

EVENT_DELIVERIES = """
SELECT delivery_id, received_at, recorded_at, outcome
FROM deliveries
WHERE event_id = %(event_id)s
ORDER BY received_at, delivery_id
"""

EVENT_DEAD_LETTERS = """
SELECT id, event_id, delivery_id, type, reason, created_at, replayed_at
FROM dead_letters
WHERE event_id = %(event_id)s
ORDER BY id
"""

# Newest first; the cursor is the (received_at, event_id) of the last row seen.
EVENTS = """
SELECT event_id, type, status, attempts, last_error, received_at, processed_at,
       (payload IS NOT NULL OR raw_body IS NOT NULL) AS has_payload
FROM events
WHERE (%(statuses)s::text[] IS NULL OR status = ANY(%(statuses)s::text[]))
  AND (%(type)s::text IS NULL OR type = %(type)s::text)
  AND (%(since)s::timestamptz IS NULL OR received_at >= %(since)s::timestamptz)
  AND (%(until)s::timestamptz IS NULL OR received_at < %(until)s::timestamptz)
  AND (%(cursor_at)s::timestamptz IS NULL
       OR (received_at, event_id) < (%(cursor_at)s::timestamptz, %(cursor_id)s::text))
ORDER BY received_at DESC, event_id DESC
LIMIT %(limit)s
"""

# What a replay by range walks through: oldest first, so events go back in natural order.
EVENTS_TO_REPLAY = """
SELECT event_id, type, status, received_at,
       (payload IS NOT NULL OR raw_body IS NOT NULL) AS has_payload
FROM events
WHERE (%(statuses)s::text[] IS NULL OR status = ANY(%(statuses)s::text[]))
  AND received_at >= %(since)s::timestamptz
  AND (%(until)s::timestamptz IS NULL OR received_at < %(until)s::timestamptz)
  AND (%(cursor_at)s::timestamptz IS NULL
       OR (received_at, event_id) > (%(cursor_at)s::timestamptz, %(cursor_id)s::text))
ORDER BY received_at, event_id
LIMIT %(limit)s
"""

# The events of a redemption or an order (expression indexes in 0004_ops_lookups.sql).
EVENTS_OF_REDEMPTION = """
SELECT event_id, type, status, attempts, last_error, received_at, processed_at
FROM events
WHERE payload #>> '{data,redemption,id}' = %(redemption_id)s
ORDER BY received_at, event_id
LIMIT 200
"""

EVENTS_OF_ORDER = """
SELECT event_id, type, status, attempts, last_error, received_at, processed_at
FROM events
WHERE payload #>> '{data,order,id}' = %(order_id)s
ORDER BY received_at, event_id
LIMIT 200
"""

# Sets a final (or failed) event back to received so the worker applies it again
# instead of recording a duplicate; the row stays locked until the caller commits, so a
# worker that takes the re-queued message first waits for the commit.
REQUEUE_EVENT = """
UPDATE events AS e
SET status = %(received)s, updated_at = now()
FROM (SELECT event_id, status FROM events WHERE event_id = %(event_id)s FOR UPDATE) AS old
WHERE e.event_id = old.event_id AND (e.payload IS NOT NULL OR e.raw_body IS NOT NULL)
RETURNING e.event_id, e.type, old.status AS previous_status,
          coalesce(e.payload::text, e.raw_body) AS payload
"""

MARK_EVENT_DEAD_LETTERS_REPLAYED = """
UPDATE dead_letters SET replayed_at = now()
WHERE event_id = %(event_id)s AND replayed_at IS NULL
"""

# --- dead letters ---------------------------------------------------------------------

DEAD_LETTERS = """
SELECT d.id, d.event_id, d.delivery_id, d.type, d.reason, d.created_at, d.replayed_at,
       e.status AS event_status
FROM dead_letters AS d
JOIN events AS e USING (event_id)
WHERE (%(type)s::text IS NULL OR d.type = %(type)s::text)
  AND (%(replayed)s::boolean IS NULL OR (d.replayed_at IS NOT NULL) = %(replayed)s::boolean)
  AND (%(cursor)s::bigint IS NULL OR d.id < %(cursor)s::bigint)
ORDER BY d.id DESC
LIMIT %(limit)s
"""

DEAD_LETTER = """
SELECT d.id, d.event_id, d.delivery_id, d.type, d.reason, d.created_at, d.replayed_at,
       e.status AS event_status, (e.payload IS NOT NULL OR e.raw_body IS NOT NULL) AS has_payload
FROM dead_letters AS d
JOIN events AS e USING (event_id)
WHERE d.id = %(id)s
"""

# --- flags ----------------------------------------------------------------------------

FLAGS = """
SELECT id, category, redemption_id, rollback_id, voucher_id, failure_code, failure_message,
       event_id, status, note, created_at, resolved_at
FROM flags
WHERE (%(status)s::text IS NULL OR status = %(status)s::text)
  AND (%(failure_code)s::text IS NULL OR failure_code = %(failure_code)s::text)
  AND (%(category)s::text IS NULL OR category = %(category)s::text)
  AND (%(redemption_id)s::text IS NULL OR redemption_id = %(redemption_id)s::text)
  AND (%(cursor)s::bigint IS NULL OR id < %(cursor)s::bigint)
ORDER BY id DESC
LIMIT %(limit)s
"""

FLAG = """
SELECT id, category, redemption_id, rollback_id, voucher_id, failure_code, failure_message,
       event_id, status, note, created_at, resolved_at
FROM flags
WHERE id = %(id)s
"""

FLAG_ACTIONS = """
SELECT id, kind, state, requested_by, request, result, error, created_at, finished_at
FROM flag_actions WHERE flag_id = %(id)s ORDER BY id
"""

# A state transition that only moves forward: resolving twice changes nothing.
RESOLVE_FLAG = """
UPDATE flags SET status = %(resolved)s, note = %(note)s, resolved_at = now()
WHERE id = %(id)s AND status = %(open)s
"""

# The drift job's own test (workers/jobs/drift.py): a card is measured from its first
# movement that reports the balance after it; a balance known otherwise (a lookup of the
# card) does not measure its movements.
UNMEASURED_CARDS = """
SELECT c.kind, count(*) AS n FROM card_balances c
WHERE NOT EXISTS (SELECT 1 FROM ledger_entries e
                  WHERE e.voucher_id = c.voucher_id AND e.balance_after IS NOT NULL)
GROUP BY c.kind
"""

# --- orders, redemptions, ledger ------------------------------------------------------

ORDER = """
SELECT order_id, status, amount, total_amount, customer_id, source_updated_at,
       status_at, last_event_id, last_event_type, created_at, updated_at
FROM orders
WHERE order_id = %(order_id)s
"""

REDEMPTION = """
SELECT redemption_id, status, parent_redemption_id, order_id, customer_id, voucher_id,
       voucher_code, voucher_type, amount, redeemed_at, failure_code, failure_message,
       rollback_id, rollback_at, rollback_reason, last_event_at, created_at, updated_at
FROM redemptions
WHERE redemption_id = %(redemption_id)s
"""

# A stack's children (each naming the parent): their statuses and cards.
CHILDREN_OF_REDEMPTION = """
SELECT redemption_id, status, voucher_id, voucher_code, voucher_type, amount, rollback_id,
       rollback_at
FROM redemptions
WHERE parent_redemption_id = %(redemption_id)s
ORDER BY redemption_id
LIMIT 200
"""

REDEMPTIONS_OF_ORDER = """
SELECT redemption_id, status, parent_redemption_id, order_id, customer_id, voucher_id,
       voucher_code, voucher_type, amount, redeemed_at, failure_code, failure_message,
       rollback_id, rollback_at, rollback_reason, last_event_at, created_at, updated_at
FROM redemptions
WHERE order_id = %(order_id)s
ORDER BY redeemed_at NULLS LAST, redemption_id
LIMIT 200
"""

REDEMPTIONS_OF_CUSTOMER = """
SELECT redemption_id, status, parent_redemption_id, order_id, customer_id, voucher_id,
       voucher_code, voucher_type, amount, redeemed_at, failure_code, failure_message,
       rollback_id, rollback_at, rollback_reason, last_event_at, created_at, updated_at
FROM redemptions
WHERE customer_id = %(customer_id)s
ORDER BY redeemed_at DESC NULLS LAST, redemption_id
LIMIT 200
"""

ORDERS_OF_CUSTOMER = """
SELECT order_id, status, amount, total_amount, customer_id, source_updated_at,
       status_at, last_event_id, last_event_type, created_at, updated_at
FROM orders WHERE customer_id = %(customer_id)s
ORDER BY source_updated_at DESC NULLS LAST, order_id
LIMIT 200
"""

# The ledger belongs to the card: customer_id is the card's holder (the handlers keep every
# entry of a card on its holder as last reported), redeemer_id who redeemed.
LEDGER_ENTRIES = """
SELECT id, customer_id, redeemer_id, voucher_id, voucher_code, kind, amount, redemption_id,
       transaction_id, effect, reason, moved_at, balance_after, event_id, created_at
FROM ledger_entries
WHERE customer_id = %(customer_id)s
  AND (%(cursor)s::bigint IS NULL OR id > %(cursor)s::bigint)
ORDER BY id
LIMIT %(limit)s
"""

# A stack's parent shows the entries still waiting for its children (transactions that
# named it before the child on their card was heard of).
LEDGER_OF_REDEMPTION = """
SELECT id, customer_id, redeemer_id, voucher_id, voucher_code, kind, amount, redemption_id,
       transaction_id, effect, reason, moved_at, balance_after, event_id, created_at
FROM ledger_entries
WHERE redemption_id = %(redemption_id)s OR stack_parent_id = %(redemption_id)s
ORDER BY id
"""

LEDGER_TOTALS = """
SELECT kind, sum(amount)::bigint AS total
FROM ledger_entries
WHERE customer_id = %(customer_id)s
GROUP BY kind
"""

CUSTOMER_KNOWN = """
SELECT EXISTS (SELECT 1 FROM ledger_entries WHERE customer_id = %(customer_id)s)
    OR EXISTS (SELECT 1 FROM card_balances WHERE customer_id = %(customer_id)s)
    OR EXISTS (SELECT 1 FROM orders WHERE customer_id = %(customer_id)s)
    OR EXISTS (SELECT 1 FROM redemptions WHERE customer_id = %(customer_id)s) AS known
"""

# --- search ---------------------------------------------------------------------------

SEARCH_EVENTS = """
SELECT event_id, type, status FROM events WHERE event_id = %(q)s
UNION
SELECT e.event_id, e.type, e.status
FROM deliveries AS d JOIN events AS e USING (event_id)
WHERE d.delivery_id = %(q)s
"""

SEARCH_REDEMPTIONS = """
SELECT redemption_id, status, order_id, customer_id, voucher_code
FROM redemptions
WHERE redemption_id = %(q)s OR rollback_id = %(q)s OR voucher_code = %(q)s
ORDER BY redemption_id
LIMIT 50
"""

SEARCH_ORDERS = """
SELECT order_id, status, customer_id FROM orders WHERE order_id = %(q)s
"""

# --- stats ----------------------------------------------------------------------------

EVENTS_BY_STATUS = "SELECT status, count(*) AS n FROM events GROUP BY status"

OPEN_FLAGS_BY_CATEGORY = """
SELECT category, count(*) AS n FROM flags WHERE status = %(open)s GROUP BY category
"""

PENDING_DEAD_LETTERS = "SELECT count(*) AS n FROM dead_letters WHERE replayed_at IS NULL"

# Events whose processing has not finished (``UNFINISHED_STATUSES``) and the oldest's age.
OLDEST_WAITING = """
SELECT extract(epoch FROM now() - min(received_at))::float8 AS age_seconds,
       count(*) AS n
FROM events
WHERE status = ANY(%(statuses)s::text[])
"""

DELIVERIES_PER_MINUTE = """
SELECT date_trunc('minute', received_at) AS minute, outcome, count(*) AS n
FROM deliveries
WHERE received_at >= date_trunc('minute', now()) - make_interval(mins => %(minutes)s - 1)
GROUP BY 1, 2
ORDER BY 1, 2
"""

LAG_PER_MINUTE = """
SELECT date_trunc('minute', processed_at) AS minute,
       percentile_cont(0.95) WITHIN GROUP (
           ORDER BY extract(epoch FROM processed_at - received_at))::float8 AS p95
FROM events
WHERE received_at >= date_trunc('minute', now()) - make_interval(mins => %(minutes)s + 60)
  AND processed_at >= date_trunc('minute', now()) - make_interval(mins => %(minutes)s - 1)
GROUP BY 1
"""

LAG_LAST_HOUR = """
SELECT count(*) AS n,
       percentile_cont(0.5) WITHIN GROUP (
           ORDER BY extract(epoch FROM processed_at - received_at))::float8 AS p50,
       percentile_cont(0.95) WITHIN GROUP (
           ORDER BY extract(epoch FROM processed_at - received_at))::float8 AS p95,
       max(extract(epoch FROM processed_at - received_at))::float8 AS max
FROM events
WHERE received_at >= now() - interval '2 hours'
  AND processed_at >= now() - interval '1 hour'
"""

CURRENT_MINUTE = "SELECT date_trunc('minute', now()) AS minute"

OUTCOMES_LAST_HOUR = """
SELECT outcome, count(*) AS n FROM deliveries
WHERE received_at >= now() - interval '1 hour'
GROUP BY outcome
"""
