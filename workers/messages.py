"""The one message the receiver sends to the workers, in Celery's wire format.

Pure functions, no Celery import: the receiver builds the message itself and pushes it to
the broker's Redis list in one round trip. Going through ``task.apply_async`` costs about
a millisecond of Python per request (producer pools, routing, signals, option merging),
which halved the receiver's throughput in the benchmark; the bytes pushed here are the
ones kombu's Redis transport would push for the same call (task protocol 2, JSON body,
base64 body encoding), and the end-to-end tests prove a real worker consumes them.

The message is JSON only: ``body`` (the raw request body as text), ``delivery_id`` and
``received_at``. The task's repr fields never include the body, so Celery's own log lines
cannot leak it.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from typing import Any

PROCESS_DELIVERY_TASK = "voucherify.process_delivery"
DELIVERY_QUEUE = "deliveries"
JOBS_QUEUE = "jobs"
PARKED_QUEUE = "deliveries.parked"
"""Deliveries the database could not take even after their retries; never consumed."""
ACCEPTED_HASH = "deliveries.accepted"
"""delivery id -> message, for every delivery answered 202 and not yet recorded in the inbox.

Celery's Redis transport takes a message off the list (BRPOP) before it records it as
unacknowledged: a worker killed, or a Redis restarted, between the two loses it. The
receiver writes this copy in the same atomic step as the queue push, the worker deletes
it once the delivery is in PostgreSQL, and the re-drive job pushes again what stayed
here too long (see ``workers.jobs.accepted``).
"""
ACCEPTED_INDEX = "deliveries.accepted.index"
"""delivery id -> accepted-at (unix seconds): which accepted copies are old."""

_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"


def delivery_kwargs(body: str, delivery_id: str, received_at: str) -> dict[str, str]:
    return {"body": body, "delivery_id": delivery_id, "received_at": received_at}


def safe_kwargsrepr(delivery_id: str) -> str:
    return repr({"delivery_id": delivery_id, "body": "<redacted>"})


def celery_message(
    task: str,
    kwargs: dict[str, Any],
    queue: str,
    task_id: str | None = None,
    kwargsrepr: str = "{}",
) -> bytes:
    """A Celery task message (protocol 2) as kombu's Redis transport stores it."""
    task_id = task_id or str(uuid.uuid4())
    payload = json.dumps(
        [[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
        separators=(",", ":"),
    ).encode()
    envelope = {
        "body": base64.b64encode(payload).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": "()",
            "kwargsrepr": kwargsrepr,
            "origin": _ORIGIN,
            "ignore_result": True,
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


def delivery_message(body: str, delivery_id: str, received_at: str) -> bytes:
    return celery_message(
        PROCESS_DELIVERY_TASK,
        delivery_kwargs(body, delivery_id, received_at),
        DELIVERY_QUEUE,
        task_id=delivery_id,
        kwargsrepr=safe_kwargsrepr(delivery_id),
    )
