"""Finish writing the pool jobs whose write began before the pool's ``flush`` drops them.

Celery's prefork pool (``celery.concurrency.asynpool.AsynPool``) writes a job to a pool
process's pipe without blocking, one piece each time the event loop finds the pipe
writable. A job larger than the pipe's buffer (64 KiB on Linux) takes several pieces, and
a batch of 100 deliveries is about 240-610 KB. At a warm shutdown the worker closes the
pool first, then the consumer stops and calls ``AsynPool.flush``, which finishes started
writes only while the pool is running: closed, it forgets them. ``Pool.join`` then writes
a stop sentinel (8 bytes) to every process's pipe; a job cut off mid-write takes those 8
bytes as part of its own body, its pool process waits for the rest forever, and the join
with it: the worker held SIGTERM until the platform's SIGKILL
(``tests/fault/test_worker_faults.py``, about 1 run in 20; py-spy showed a pool process
reading a 609,862-byte job with 282,616 bytes to go). Celery's own tasks are far smaller
than a pipe's buffer: one write each.

``finish_started_writes_on_flush()`` makes ``flush`` first write the rest of every job
whose write began, blocking (``AsynPool._flush_writer``, as ``flush`` itself does while
the pool runs), whatever the pool's state. ``flush`` then goes on as before: a job its
process has not acknowledged yet is dropped from the pool's books (its messages are not
acknowledged and go back to the queue; if the process applied it all the same, the
inbox records the second delivery as a duplicate), the jobs not begun are never sent.

Checked on celery 5.7.0 (pinned ``>=5.7,<5.8``). Upstream: no issue found (``flush``
finishes started writes only ``if self._state == RUN``, unchanged since 2013); maybe the
same symptom: celery/celery#1770 (closed). The issue we would file is in the issue-25
notes.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.concurrency.asynpool import AsynPool, _get_job_writer, gen_not_started

log = logging.getLogger(__name__)

_PATCHED = "_finishes_started_writes"


def finish_started_writes(pool: Any) -> int:
    """Write the rest of every job of ``pool`` (an ``AsynPool``) whose write began; how
    many."""
    writers = getattr(pool, "_active_writers", None)
    if not writers:
        return 0
    finished = 0
    for job in tuple(pool._cache.values()):
        writer = _get_job_writer(job)
        proc = getattr(job, "_write_to", None)
        if writer is None or writer not in writers or proc is None or gen_not_started(writer):
            continue
        pool._flush_writer(proc, writer)
        finished += 1
    return finished


def finish_started_writes_on_flush() -> None:
    """Patch ``AsynPool.flush`` (idempotent, per process)."""
    if getattr(AsynPool.flush, _PATCHED, False):
        return
    original = AsynPool.flush

    def flush(self: AsynPool) -> Any:
        finished = finish_started_writes(self)
        if finished:
            log.info("pool.writes_finished", extra={"jobs": finished})
        return original(self)

    setattr(flush, _PATCHED, True)
    flush.__wrapped__ = original  # type: ignore[attr-defined]
    AsynPool.flush = flush
