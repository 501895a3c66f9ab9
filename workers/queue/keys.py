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

QUEUES = (DELIVERY_QUEUE, PARKED_QUEUE, JOBS_QUEUE)
"""The Redis lists whose depth the stats and gauges report (the accepted set beside them)."""
