"""The worker's entry module sets up Prometheus' multi-process folder before anything
imports prometheus_client, and a process where something imported it first stops with a
clear error instead of serving its main process's metrics alone. Real interpreters: the
choice is made once per process, at import."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, process_env

# Never contacted: importing the entry module opens no connection.
ENTRY_ENV = {
    "DATABASE_URL": "postgresql://app@127.0.0.1:9/unused",
    "REDIS_URL": "redis://127.0.0.1:9/0",
}


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = process_env(**ENTRY_ENV)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip


def test_the_entry_module_chooses_multi_process_metrics_before_any_import_of_them() -> None:
    result = run_python(
        "import workers.app, prometheus_client.values as v; print(v.ValueClass.__name__)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "MmapedValue"  # shared files, not MutexValue


def test_prometheus_imported_before_the_entry_module_is_refused_with_a_clear_error() -> None:
    result = run_python("import prometheus_client, workers.app")
    assert result.returncode != 0
    assert "prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set" in (
        result.stderr
    )
