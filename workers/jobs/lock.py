"""One run of a job at a time, whoever starts it: a lock in Redis with an expiry.

``SET key token NX PX ttl`` takes the lock; a Lua compare-and-delete releases it only when
it still holds our token, so a run whose lock expired can never release the next run's.
The expiry frees the lock of a run whose process died; it is set longer than a run can
last (the job's time budget plus the Celery hard time limit's margin), so it never expires
under a live run.

Redis rather than a PostgreSQL advisory lock: the lock must have an expiry that does not
depend on the database noticing a dead client, and Redis is already where every process
of the pipeline meets (the broker).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import redis

log = logging.getLogger(__name__)

LOCK_PREFIX = "voucherify:jobs:lock:"

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


class JobLock:
    """``acquire()`` is False while another run holds the lock; ``release_quietly()`` after."""

    def __init__(self, client: redis.Redis, job: str, ttl_seconds: float) -> None:
        self.client = client
        self.key = LOCK_PREFIX + job
        self.ttl_ms = max(1, int(ttl_seconds * 1000))
        self.token = uuid.uuid4().hex
        self.held = False

    def acquire(self) -> bool:
        self.held = bool(self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))
        return self.held

    def release(self) -> bool:
        """Delete the lock if it is still ours; False when it expired or was taken over."""
        if not self.held:
            return False
        self.held = False
        released: Any = self.client.eval(_RELEASE, 1, self.key, self.token)
        return bool(released)

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
