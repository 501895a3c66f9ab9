"""What a custom task execution strategy needs of Celery's worker internals, in one place.

``Task.Strategy`` is Celery's documented hook ("execution strategy used, or the qualified
name of one"), but what a strategy must do with a message is not public:
``workers.batching`` builds its requests as ``celery.worker.strategy.default`` does
(``create_request_cls`` from ``celery.worker.request``, the three protocol readers
``hybrid_to_proto2`` / ``proto1_to_proto2``, the request class's keyword arguments), reads
the pool's process count (``limit``) and the shutdown flags of ``celery.worker.state``
(``should_stop``, ``should_terminate``, set by the signal handlers before the event loop
ends). ``tests/compat/test_upstream.py`` checks each of them.

Checked on celery 5.7.0 (pinned ``>=5.7,<5.8``). Upstream: no public API for a strategy
to build requests; the model, ``celery-batches`` (``celery_batches.Batches.Strategy``),
copies the same code from ``celery.worker.strategy.default``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery, Task, bootsteps
from celery.utils.imports import symbol_by_name
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer
from celery.worker.request import Request, create_request_cls
from celery.worker.strategy import hybrid_to_proto2, proto1_to_proto2
from kombu.message import Message

RequestMaker = Callable[[Message, Any, Any, Any], Request]
"""``(message, body, on_ack, on_reject) -> Request``: what the consumer hands a strategy."""


def request_maker(task: Task, app: Celery, consumer: Consumer) -> RequestMaker:
    """Requests of ``task`` made from the consumer's messages, as Celery's default
    strategy makes them (any of the three message protocols)."""
    hostname = consumer.hostname
    eventer = consumer.event_dispatcher
    connection_errors = consumer.connection_errors
    request_cls = create_request_cls(
        symbol_by_name(task.Request), task, consumer.pool, hostname, eventer, app=app
    )

    def make(message: Message, body: Any, on_ack: Any, on_reject: Any) -> Request:
        # As celery.worker.strategy.default reads the three protocol versions.
        if body is None and "args" not in message.payload:
            body, headers, decoded, utc = (
                message.body,
                message.headers,
                False,
                app.uses_utc_timezone(),
            )
        elif "args" in message.payload:
            body, headers, decoded, utc = hybrid_to_proto2(message, message.payload)
        else:
            body, headers, decoded, utc = proto1_to_proto2(message, body)
        request: Request = request_cls(
            message,
            on_ack=on_ack,
            on_reject=on_reject,
            app=app,
            hostname=hostname,
            eventer=eventer,
            task=task,
            body=body,
            headers=headers,
            decoded=decoded,
            utc=utc,
            connection_errors=connection_errors,
        )
        return request

    return make


def pool_processes(consumer: Consumer) -> int:
    """How many jobs the worker's pool runs at once (its processes), at least 1."""
    return max(1, int(getattr(consumer.pool, "limit", 1) or 1))


def stopping(consumer: Consumer) -> bool:
    """Whether the worker is shutting down: a signal asked it to (``should_stop``,
    ``should_terminate``: set in the handler, before the event loop ends), or its consumer
    is being stopped."""
    asked = (worker_state.should_stop, worker_state.should_terminate)
    return any(flag is not None and flag is not False for flag in asked) or (
        consumer.blueprint is not None and consumer.blueprint.state != bootsteps.RUN
    )
