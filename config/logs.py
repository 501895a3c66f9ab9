"""One JSON object per line on stdout, for every process.

Log events, not prose: ``log.info("delivery.enqueued", extra={"delivery_id": ...})``.
Fields bound with ``bind()`` (delivery id, event id, type) are added to every line logged
inside the ``with`` block. Bodies, signatures and secrets are never passed here.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "log_context", default=None
)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        context = _context.get()
        if context:
            line.update(context)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, separators=(",", ":"))


def configure(level: str) -> None:
    """Send every logger's records to stdout as JSON lines (idempotent)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # Quiet libraries that log a line per request or per connection at INFO.
    for noisy in ("werkzeug", "gunicorn.access", "kombu", "amqp"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


@contextlib.contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every line logged inside the block."""
    current = _context.get() or {}
    token = _context.set({**current, **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def masked_in(text: str, code: str | None) -> str:
    """``text`` with the card's code masked wherever it appears (an error that quotes a
    request's path, an answer's body)."""
    return text.replace(code, masked_code(code) or "") if code else text


def masked_code(code: str | None) -> str | None:
    """A card's code as logs and flag messages show it: its last 4 characters (a gift card
    code can be spent by whoever reads it). ``…WXYZ``; a code of 4 or fewer: ``…``."""
    if not code:
        return code
    return "\u2026" + (code[-4:] if len(code) > 4 else "")
