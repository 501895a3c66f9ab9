"""The ``release`` process: apply the database migrations, then exit."""

from __future__ import annotations

import logging
import os

import psycopg

from config import logs
from config.entry import load_settings
from migrations import apply_migrations


def main() -> None:
    settings = load_settings("release", os.environ)
    logs.configure(settings.log_level)
    # One connection, one transaction (apply_migrations); statements prepared only where
    # DATABASE_POOLER allows (behind PgBouncer they would outlive this connection).
    with psycopg.connect(
        settings.database_url, autocommit=True, prepare_threshold=settings.db_prepare_threshold
    ) as conn:
        applied = apply_migrations(conn)
    logging.getLogger("migrations").info("migrations.done", extra={"applied": applied})


if __name__ == "__main__":
    main()
