"""Let a billiard pool process exit 2 s after its last result, not 30 s.

A billiard pool process that exits first waits, up to
``GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT`` x 0.1 s (300: 30 s), until the main process
has read every result it sent. During a warm shutdown the main process joins the pool
without reading results, so a process that finished a task at that instant held the whole
SIGTERM up for 30 s (``tests/fault/test_worker_faults.py``: 1 run in 4), as long as a PaaS
waits before it SIGKILLs. An unread result only leaves its message unacknowledged: kombu
hands it back, and the inbox records that second delivery as a duplicate. The module
constant is read at each exit; pool processes inherit it.

Checked on billiard 4.3.2 (pinned ``>=4.3,<4.4``). Upstream: the constant came with
celery/billiard#279 (for #278) and is not configurable; no issue asks to make it so (the
one we would file is in the issue-25 notes).
"""

from __future__ import annotations

import billiard.pool

EXIT_WAIT_RETRIES = 20
"""x 0.1 s: how long a pool process waits for its last results to be read."""


def shorten_pool_exit_wait() -> None:
    billiard.pool.GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT = EXIT_WAIT_RETRIES
