"""One run of a job at a time, whoever starts it: redis-py's ``Lock`` with an expiry.

redis-py's ``Lock`` takes the key with ``SET NX PX`` and releases it with a Lua
compare-and-delete, so a run whose lock expired can never release the next run's. The
expiry frees the lock of a run whose process died; it is set longer than a run can last
(the job's time budget plus the Celery hard time limit's margin), so it never expires
under a live run. ``JobLock`` only adds the job's key, a non-blocking take, and a release
that never raises over the run's own outcome.

Redis rather than a PostgreSQL advisory lock: the lock must have an expiry that does not
depend on the database noticing a dead client, and Redis is already where every process
of the pipeline meets (the broker).
"""

from __future__ import annotations

import logging
import uuid

import redis
from redis.exceptions import LockError

log = logging.getLogger(__name__)

LOCK_PREFIX = "voucherify:jobs:lock:"


class JobLock:
    """``acquire()`` is False while another run holds the lock; ``release_quietly()`` after."""

    def __init__(self, client: redis.Redis, job: str, ttl_seconds: float) -> None:
        self.key = LOCK_PREFIX + job
        # Not thread-local: the run that took it may release it from another thread.
        self._lock = client.lock(
            self.key, timeout=max(0.001, ttl_seconds), blocking=False, thread_local=False
        )
        self.held = False

        self.token = uuid.uuid4().hex
        """This holder's value of the key while it holds the lock."""

    def acquire(self) -> bool:
        self.held = bool(self._lock.acquire(blocking=False, token=self.token))
        return self.held

    def release(self) -> bool:
        """Delete the lock if it is still ours; False when it expired or was taken over."""
        if not self.held:
            return False
        self.held = False
        try:
            self._lock.release()
        except LockError:  # LockNotOwnedError: expired, maybe taken by the next run
            return False
        return True

    def release_quietly(self) -> None:
        """Release at the end of a run; never raises over the run's own outcome."""
        try:
            if self.held and not self.release():
                log.error("job.lock_lost", extra={"lock": self.key})
        except redis.RedisError as error:  # the expiry frees it
            log.warning(
                "job.lock_not_released",
                extra={"lock": self.key, "error": f"{type(error).__name__}: {error}"},
            )
