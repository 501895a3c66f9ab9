"""psycopg records a statement as prepared when it *sends* its ``Parse`` (``_prepared``, a
``psycopg._preparing.PrepareManager``, ``maybe_add_to_cache``), and checks that record
against the server's answer only the first time it meets a query. In pipeline mode,
after a statement fails, PostgreSQL skips every later message until the next Sync: a
query reaching its ``prepare_threshold``-th run in that stretch is recorded as prepared
though its ``Parse`` never ran, and its next run sends only Bind/Execute of a name the
server lacks (``InvalidSqlStatementName: prepared statement "_pg3_N" does not exist``).

psycopg forgets its record on its own rollbacks (``_rollback_gen``), not on a
``ROLLBACK TO SAVEPOINT`` sent by hand (its ``ROLLBACK`` check runs only on a query's
first run) and has no public call for it: ``forget_prepared`` clears the record, and
psycopg sends ``DEALLOCATE ALL`` for the server's side right after the connection's next
statement (so that statement must not be one it prepares: run it with ``prepare=False``).
Statements are prepared again after ``prepare_threshold`` more runs.
"""

from __future__ import annotations

from typing import Any

import psycopg


def forget_prepared(conn: psycopg.Connection[Any]) -> None:
    """Forget every statement psycopg believes prepared on ``conn`` (the server's copies
    are deallocated after the next statement). Call it once out of an aborted pipeline
    stretch (after its sync), before queuing anything else."""
    conn._prepared.clear()
