"""A Celery task that is handed its messages in batches: ``BatchTask``.

The worker's consumer buffers a batch task's requests and sends the pool one job per batch
(``run_batch(items)``) once ``flush_every`` requests are buffered or the oldest has waited
``flush_interval`` seconds: at most one batch per pool process, and never two batches in
flight that share a key (``keys_of``: the rows a delivery's event writes), so that two pool
processes never wait on each other's row locks. A request is acknowledged only after its
job returned; one the job did not finish, and every request of a job that raised or whose
process died, is rejected with ``requeue``; once a shutdown began nothing is dispatched
and what is buffered goes back to the queue (the job already on its way to a pool process:
``compat.celery_asynpool``). Why our own and not ``celery-batches``, and why the prefetch
window is twice a batch (``workers.celery_app``): docs/architecture.md, "Batches".
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery, Task
from celery.worker.consumer import Consumer
from celery.worker.request import Request
from kombu.message import Message as KombuMessage

from compat import celery_strategy, kombu_redis

log = logging.getLogger(__name__)

Item = tuple[str, dict[str, Any], int]
"""One request as the pool process receives it: task id, keyword arguments, retries."""

Entry = tuple[Request, frozenset[str], float]
"""One buffered request: the request, its keys, when it came (``time.monotonic()``)."""


class BatchTask(Task):  # type: ignore[misc]  # celery ships no annotations
    """A task whose ``run_batch(items)`` applies a list of requests in one pool job."""

    abstract = True
    typing = False

    flush_every: int = 100
    """Requests per batch, at most."""
    flush_interval: float = 0.05
    """Seconds a request waits, at most, for its batch to fill."""

    def run(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("a batch task runs through run_batch(items)")

    def run_batch(self, items: Sequence[Item]) -> Sequence[str]:
        """Apply ``items``; the task ids not finished (they are given back to the broker)."""
        raise NotImplementedError

    def keys_of(self, kwargs: dict[str, Any]) -> frozenset[str]:
        """What a request's job would contend for with another batch (row locks): two
        batches in flight never share a key. Computed in the consumer, once per request;
        none by default."""
        return frozenset()

    def Strategy(self, task: BatchTask, app: Celery, consumer: Consumer) -> Callable[..., None]:
        pool = consumer.pool
        timer = consumer.timer
        make_request = celery_strategy.request_maker(task, app, consumer)
        buffer: list[Entry] = []  # in order of arrival
        deadline: list[Any] = []  # the pending flush timer, if any
        # At most one batch per pool process: the rest waits here, unacknowledged, and
        # fills the next batch (a warm shutdown hands it back at once).
        limit = celery_strategy.pool_processes(consumer)
        in_flight = [0]
        held: set[str] = set()  # the keys of the batches in flight

        def flush() -> None:
            if deadline:
                deadline.pop().cancel()
            if celery_strategy.stopping(consumer):
                return  # what is buffered goes back to the queue with the channel
            while buffer and in_flight[0] < limit:
                if len(buffer) < task.flush_every:
                    # Not full: it goes once its oldest request waited its time.
                    left = task.flush_interval - (time.monotonic() - buffer[0][2])
                    if left > 0:
                        deadline.append(timer.call_after(left, flush))
                        return
                requests, keys = take_batch(buffer, held, task.flush_every)
                if not requests:
                    return  # all of it waits on a batch in flight; its end flushes
                held.update(keys)
                in_flight[0] += 1
                dispatch(task, pool, requests, functools.partial(done, keys))

        def done(keys: set[str]) -> None:
            in_flight[0] -= 1
            held.difference_update(keys)
            if buffer:
                flush()

        def on_message(
            message: KombuMessage,
            body: Any,
            ack: Any,
            reject: Any,
            callbacks: Any,
            **_: Any,
        ) -> None:
            request = make_request(message, body, ack, reject)
            buffer.append((request, task.keys_of(request.kwargs), time.monotonic()))
            if len(buffer) >= task.flush_every:
                flush()
            elif not deadline:
                deadline.append(timer.call_after(task.flush_interval, flush))

        return on_message


def take_batch(buffer: list[Entry], held: set[str], size: int) -> tuple[list[Request], set[str]]:
    """Take from ``buffer``, in order, up to ``size`` requests that share no key with
    ``held`` (the batches in flight); the rest stays, in order. Two requests of one batch
    may share keys: one transaction applies them in turn."""
    taken: list[Request] = []
    keys: set[str] = set()
    kept: list[Entry] = []
    for entry in buffer:
        request, its_keys, _ = entry
        if len(taken) < size and held.isdisjoint(its_keys):
            taken.append(request)
            keys.update(its_keys)
        else:
            kept.append(entry)
    buffer[:] = kept
    return taken, keys


def dispatch(task: BatchTask, pool: Any, requests: list[Request], done: Callable[[], None]) -> None:
    """One pool job for ``requests``; each acknowledged or given back when it is over,
    then ``done()``."""
    items: list[Item] = []
    for request in requests:
        retries = int(request.request_dict.get("retries") or 0)
        items.append((request.id, request.kwargs, retries))

    def on_return(unfinished: Sequence[str] | None) -> None:
        given_back = set(unfinished or ())
        for request in requests:
            if request.id in given_back:
                request.reject(requeue=True)
        acknowledge([r for r in requests if r.id not in given_back])
        done()

    def on_error(_: BaseException) -> None:
        for request in requests:
            request.reject(requeue=True)
        done()

    pool.apply_async(run_batch_job, (task, items), callback=on_return, error_callback=on_error)


def acknowledge(requests: list[Request]) -> None:
    """Acknowledge ``requests`` in one Redis round trip when the transport can
    (``compat.kombu_redis.QoS.ack_many``), else one by one. A failed acknowledgement is
    logged, as Celery logs its own: the messages stay unacknowledged in Redis and are
    delivered again after the visibility timeout, then recorded as duplicates."""
    if not requests:
        return
    qos: Any = getattr(requests[0].message.channel, "qos", None)
    if not hasattr(qos, "ack_many"):
        for request in requests:
            request.acknowledge()
        return
    try:
        qos.ack_many([r.message.delivery_tag for r in requests])
    except Exception as exc:  # noqa: BLE001 - as Celery's own "Couldn't ack"
        log.error("batch.ack_failed", extra={"error": type(exc).__name__, "size": len(requests)})
    for request in requests:  # as Message.ack and Request.acknowledge mark them
        kombu_redis.mark_acknowledged(request.message)
        request.acknowledged = True


def run_batch_job(task: BatchTask, items: Sequence[Item]) -> list[str]:
    """What a pool process runs (module level: the prefork pool pickles it by name)."""
    return list(task.run_batch(items))
