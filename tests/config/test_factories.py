"""Factories, no side effects at import: importing the pipeline's modules in a bare
environment reads no setting, starts no embedded server and opens no connection."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.conftest import ROOT, run_captured

MODULES = (
    "web.app",
    "receiver.views",
    "workers.queue",
    "ops",
    "workers.celery_app",
    "workers.tasks",
    "workers.processing",
    "schemas.redemption",
    "migrations",
)

# Loaded first by the interpreter (it is on PYTHONPATH): any connect() fails loudly, so
# an import that opens a socket (to Redis, PostgreSQL or anything) fails the import.
SITECUSTOMIZE = """
import socket

def _refuse(self, *args, **kwargs):
    raise RuntimeError(f"socket connect at import time: {args!r}")

socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
"""


def test_modules_import_without_settings_servers_or_sockets(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    script = (
        f"import {', '.join(MODULES)}\n"
        "import socket, sys\n"
        "assert 'sitecustomize' in sys.modules\n"
        "try:\n"
        "    socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
        "except RuntimeError:\n"
        "    print('guard-active')\n"
        "print(sorted(m for m in sys.modules\n"
        "             if m.split('.')[0] in ('config', 'web', 'workers', 'devtools')))\n"
    )
    # No DATABASE_URL, REDIS_URL or secret; nothing inherited but a PATH.
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": f"{hooks}:{ROOT}"}
    result = run_captured([sys.executable, "-c", script], env, workdir, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "guard-active" in result.stdout  # the guard really was in place
    assert list(workdir.iterdir()) == []  # no .local folder, nothing written
    # Importing the factories does not pull in an entry module (they read the env).
    assert "'web.wsgi'" not in result.stdout
    assert "'workers.app'" not in result.stdout
    # Nor the dev and test tooling: production code never imports devtools (the embedded
    # servers, the test payloads); see also tests/config/test_entry.py.
    assert "devtools" not in result.stdout
