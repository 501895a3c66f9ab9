"""The one message the receiver sends to the workers, in Celery's wire format.

Pure functions, no Celery import: the receiver builds the message itself and pushes it to
the broker's Redis list in one round trip. Going through ``task.apply_async`` costs about
a millisecond of Python per request (producer pools, routing, signals, option merging),
which halved the receiver's throughput in the benchmark; the bytes built here are the
ones kombu's Redis transport would push for the same call (task protocol 2, JSON body,
base64 body encoding): ``tests/compat/`` compares them with Celery's own, and the
end-to-end tests prove a real worker consumes them.

The message is JSON only: ``body`` (the raw request body as text), ``delivery_id`` and
``received_at``. The task's repr fields never include the body, so Celery's own log lines
cannot leak it.

Encoded with orjson: the body, a JSON document itself, is embedded as a JSON string (its
every quote escaped), then base64, then the envelope; the standard library's encoder took
65 us of the receiver's request for that, orjson about a tenth. The output is the same
compact JSON, key order kept, except that non-ASCII characters are written as UTF-8
instead of ``\\u`` escapes: what the message declares (``content-encoding: utf-8``) and what
kombu decodes before Celery's JSON loader reads it.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from workers.queue.keys import DELIVERY_QUEUE, PROCESS_DELIVERY_TASK

_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"


@dataclass(frozen=True, slots=True)
class Message:
    """One delivery as the entry task receives it: the raw body and who/when it came."""

    body: str
    delivery_id: str
    received_at: str

    def kwargs(self) -> dict[str, str]:
        return {"body": self.body, "delivery_id": self.delivery_id, "received_at": self.received_at}

    @classmethod
    def decode(cls, raw: bytes | str) -> Message | None:
        """The delivery a stored message carries (``encode`` read back); None if unreadable."""
        try:
            envelope = json.loads(raw)
            _, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
            return cls(str(kwargs["body"]), str(kwargs["delivery_id"]), str(kwargs["received_at"]))
        except (ValueError, KeyError, TypeError, RecursionError):  # binascii.Error: ValueError
            return None

    def encode(self) -> bytes:
        """The Celery message of the entry task for this delivery (task id = delivery id)."""
        return celery_message(
            PROCESS_DELIVERY_TASK,
            self.kwargs(),
            DELIVERY_QUEUE,
            task_id=self.delivery_id,
            kwargsrepr=safe_kwargsrepr(self.delivery_id),
        )


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
    payload = _dumps(
        [[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    )
    envelope = {
        "body": binascii.b2a_base64(payload, newline=False).decode("ascii"),
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
    return _dumps(envelope)


def _dumps(value: Any) -> bytes:
    """Compact JSON: orjson's, or the standard library's for what UTF-8 cannot carry (a
    lone surrogate in a string, which no receiver body has: it is strict UTF-8)."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()


def task_id_of(raw: bytes | str) -> str | None:
    """The task id (for a delivery: its delivery id) of a stored message; None if unreadable."""
    try:
        task_id = json.loads(raw)["headers"]["id"]
    except (ValueError, KeyError, TypeError):
        return None
    return str(task_id) if task_id is not None else None
