"""Fixtures of the web process's probe tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from web.health import close_readiness_pool
from workers.db import close_pool


@pytest.fixture(autouse=True)
def _close_process_pools() -> Iterator[None]:
    """/readyz and the gauges open this process's pools lazily: close them after each test."""
    yield
    close_readiness_pool()
    close_pool()
