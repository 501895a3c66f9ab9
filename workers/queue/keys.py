"""The names of the queue contract: Redis keys and the entry task's name."""

from __future__ import annotations

PROCESS_DELIVERY_TASK = "voucherify.process_delivery"
"""The entry task every delivery message names (``workers.tasks``)."""
DELIVERY_QUEUE = "deliveries"
JOBS_QUEUE = "jobs"
PARKED_QUEUE = "deliveries.parked"
"""Deliveries the database could not take even after their retries; never consumed."""
ACCEPTED_HASH = "deliveries.accepted"
"""delivery id -> message, for every delivery answered 202 and not yet recorded."""
ACCEPTED_INDEX = "deliveries.accepted.index"
"""delivery id -> accepted-at (unix seconds): which accepted copies are old."""
ACCEPTED_PUSHES = "deliveries.accepted.pushes"
"""delivery id -> how many times the sweep pushed its accepted copy again (absent: never)."""
STARTS = "deliveries.starts"
"""delivery id -> how many times a worker began to apply it without finishing (absent:
never): a delivery that kills its pool process is counted, isolated, then dead-lettered."""
SEEN_PREFIX = "deliveries.seen:"
"""``deliveries.seen:<event id>`` -> the delivery id that first carried the event, for
``SEEN_SECONDS``: a repeat of an accepted event id is answered 202 without a message."""
SEEN_SECONDS = 3 * 86_400
"""How long an accepted event id is remembered: Voucherify's retries of one message last a
day or two (three days in its older policy); a repeat after that is a duplicate delivery
the worker records, never a second application."""

QUEUES = (DELIVERY_QUEUE, PARKED_QUEUE, JOBS_QUEUE)
"""The Redis lists whose depth the stats and gauges report (the accepted set beside them)."""
