from __future__ import annotations

import os

from workers.db import close_pool, get_pool


def test_a_forked_child_gets_its_own_pool_never_the_parents(database_url: str) -> None:
    parent_pool = get_pool(database_url)
    try:
        with parent_pool.connection() as conn:
            conn.execute("SELECT 1")
        pid = os.fork()
        if pid == 0:  # the child: exit status tells the parent what it saw
            child_pool = get_pool(database_url)
            ok = child_pool is not parent_pool
            with child_pool.connection() as conn:
                ok = ok and conn.execute("SELECT pg_backend_pid()").fetchone() is not None
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert get_pool(database_url) is parent_pool  # the parent's pool is untouched
        with parent_pool.connection() as conn:
            conn.execute("SELECT 1")
    finally:
        close_pool()
