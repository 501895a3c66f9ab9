"""prometheus_client chooses between per-process and multi-process values once, when
``prometheus_client.values`` is imported, by looking at ``PROMETHEUS_MULTIPROC_DIR``.
A process that imported it before the folder was set (a library that imports it early)
would keep per-process values, and the worker's endpoint would show only its own main
process. ``rechoose_value_class`` makes the metrics created from now on choose again."""

from __future__ import annotations

import sys


def rechoose_value_class() -> None:
    values = sys.modules.get("prometheus_client.values")
    if values is not None:  # imported too early: metrics created from now on are shared
        values.ValueClass = values.get_value_class()  # type: ignore[attr-defined]
