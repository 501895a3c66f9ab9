"""The commands of ``vfy-pipeline`` about the program and its environment rather than the
pipeline's data: its version, the configuration as a process reads it, the migrations."""

from __future__ import annotations

import argparse
import importlib.metadata
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path

from config.entry import check_settings
from migrations import migration_status
from ops.cli.output import Output, text
from ops.context import OpsContext

EnvironCommand = Callable[[argparse.Namespace, Mapping[str, str], Output], int]
"""A command whose input is the environment itself (``config check``): run before, and
instead of, the settings every other command needs."""
CHECKED_PROCESSES = ("web", "worker", "beat", "release", "cli")
PACKAGE = "voucherify-pipeline"


def package_version() -> str:
    """The installed package's version; from the checkout's pyproject.toml when the
    package is not installed (a platform that installs only the lock)."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        try:
            return str(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def config_check(args: argparse.Namespace, environ: Mapping[str, str], out: Output) -> int:
    """The settings of ``args.process`` as the environment gives them (exit 2, the same
    one line as the process would print, when one is missing or bad)."""
    settings = check_settings(args.process, environ)  # SystemExit(2) with its line
    shown = settings.redacted()
    if out.as_json:
        out.json({"process": args.process, "settings": shown})
    else:
        width = max(map(len, shown))
        for name, value in shown.items():
            out.line(f"{name:<{width}}  {value}")
        out.line(f"{args.process}: configuration ok")
    return 0


def migrations_status(args: argparse.Namespace, ctx: OpsContext, out: Output) -> int:
    with ctx.transaction() as conn:
        rows = migration_status(conn)
    pending = [row["version"] for row in rows if row["applied_at"] is None]
    unknown = [row["version"] for row in rows if not row["known"]]
    if out.as_json:
        out.json({"migrations": rows, "pending": pending, "unknown": unknown})
    else:
        for row in rows:
            state = "pending" if row["applied_at"] is None else f"applied {text(row['applied_at'])}"
            out.line(f"{row['version']}  {state}{'' if row['known'] else '  (not in this code)'}")
        out.line(
            f"{len(rows) - len(pending) - len(unknown)} applied, {len(pending)} pending"
            + (f", {len(unknown)} unknown to this code" if unknown else "")
        )
    return 1 if pending or unknown else 0
