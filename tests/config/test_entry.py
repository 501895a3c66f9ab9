"""``config.entry``: the entry modules' checked settings, and nothing started.

``DATABASE_URL`` and ``REDIS_URL`` are required: a process without one stops at start-up
with one line naming it (``scripts/dev`` supplies embedded local ones; the pipeline never
starts a server itself), and no production module imports ``devtools``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from config import entry
from config.settings import Settings
from tests.conftest import ROOT, run_captured

URLS = {
    # Valid DSNs of servers that are never contacted: start-up must fail before any connection.
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:9/unused",
    "REDIS_URL": "redis://127.0.0.1:9/0",
}
SECRET = "entry-test-secret"
# The processes of the Procfile, and the name each one gives itself in its error line.
PROCESSES = {"release": "release", "web": "web", "worker": "worker", "beat": "worker"}
TOOLING = ("devtools", "tests", "bench")
"""Top-level packages that are not the pipeline: they may import devtools, nothing else may."""


def procfile() -> dict[str, str]:
    commands = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, sep, command = line.partition(":")
        if sep and not line.startswith("#"):
            commands[name.strip()] = command.strip()
    return commands


@pytest.mark.parametrize("variable", ["DATABASE_URL", "REDIS_URL"])
def test_load_settings_without_a_url_exits_2_with_one_line(
    variable: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    environ = {**URLS, "VOUCHERIFY_WEBHOOK_SECRET": SECRET}
    del environ[variable]
    with pytest.raises(SystemExit) as caught:
        entry.load_settings("worker", environ)
    assert caught.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"worker: configuration error: {variable}: required: ")
    assert len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no .local: nothing was started


def test_load_settings_is_the_checked_settings() -> None:
    environ = {**URLS, "VOUCHERIFY_WEBHOOK_SECRET": SECRET, "PORT": "9000"}
    for process in ("web", "worker", "release", "cli"):
        settings = entry.load_settings(process, environ)
        assert settings == entry.check_settings(process, environ) == Settings.from_env(environ)
        assert (settings.database_url, settings.redis_url) == (
            URLS["DATABASE_URL"],
            URLS["REDIS_URL"],
        )


@pytest.mark.parametrize("variable", ["DATABASE_URL", "REDIS_URL"])
@pytest.mark.parametrize("process", list(PROCESSES))
def test_a_procfile_process_without_a_url_exits_2_naming_it(
    process: str, variable: str, tmp_path: Path
) -> None:
    command = procfile()[process]  # as honcho or the platform runs it: through a shell
    env = {
        # Only what a process needs to run; nothing inherited (no URL from this session).
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "HOME": str(tmp_path),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "BEAT_SCHEDULE_FILE": str(tmp_path / "beat-schedule"),
        "VOUCHERIFY_WEBHOOK_SECRET": SECRET,
        **URLS,
    }
    del env[variable]
    result = run_captured(["sh", "-c", command], env, tmp_path, timeout=120)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        f"{PROCESSES[process]}: configuration error: {variable}: required: "
    ), result.stderr
    assert "scripts/dev" in lines[0]
    assert result.returncode == 2, result.stderr
    assert list(tmp_path.iterdir()) == []  # no .local, no schedule file: nothing started


def production_modules() -> list[Path]:
    packages = [
        path
        for path in sorted(ROOT.iterdir())
        if (path / "__init__.py").exists() and path.name not in TOOLING
    ]
    assert {"config", "migrations", "workers"} <= {path.name for path in packages}
    return [module for package in packages for module in sorted(package.rglob("*.py"))]


def imported_names(module: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(module.read_text(), filename=str(module))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_no_production_module_imports_devtools() -> None:
    offenders = {
        str(module.relative_to(ROOT)): sorted(
            name for name in imported_names(module) if name.split(".")[0] in TOOLING
        )
        for module in production_modules()
    }
    assert {module: names for module, names in offenders.items() if names} == {}
