"""``vfy-pipeline``: the operators' command line (``vfy-pipeline --help``).

Reads its configuration from the environment like every process (``DATABASE_URL``,
``REDIS_URL``) and talks to PostgreSQL and Redis directly, through the same service layer
as the ops API and the dashboard (``ops.service``). ``--json`` prints machine-readable
JSON (the API's documents); without it, lines for people.

Exit status: 0 done, 1 not found or refused (a pruned payload, Redis down), 2 usage or
configuration error.

Modules: ``parser`` (the commands and their options), ``commands`` (what each one does),
``explain`` (version, config check, migrations status), ``output`` (how it prints).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

import psycopg

from config.entry import load_settings
from config.logs import JsonFormatter
from ops import service
from ops.cli.output import Output, complain
from ops.cli.parser import build_parser
from ops.context import OpsContext, direct_connect
from ops.params import ParamError

__all__ = ["build_parser", "main"]

OPTION_NAMES = {"q": "ID", "failure_code": "--code"}
"""The service's parameter names that are not ``--<name>`` on the command line."""


def option(name: str) -> str:
    """How the command line spells the parameter ``name`` (``since``: ``--since``)."""
    if name in OPTION_NAMES or name.isupper():
        return OPTION_NAMES.get(name, name)
    return "--" + name.replace("_", "-")


def log_to_stderr() -> None:
    """Warnings and errors as JSON lines on stderr: stdout is the answer."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
        root.setLevel(logging.WARNING)


def main(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    out: TextIO | None = None,
) -> int:
    args = build_parser().parse_args(argv)
    log_to_stderr()
    environ = os.environ if environ is None else environ
    output = Output(bool(getattr(args, "json", False)), out or sys.stdout)
    if not getattr(args, "needs_settings", True):  # config check: the environment is its input
        return int(args.handler(args, environ, output))
    settings = load_settings("cli", environ)
    context = OpsContext(settings, connect=direct_connect(settings.database_url))
    try:
        return int(args.handler(args, context, output))
    except ParamError as exc:
        complain(f"{option(exc.name)}: {exc.problem}")
        return 2
    except service.NotFound as exc:
        if output.as_json:
            output.json({"error": "not_found"})
        complain(f"not found: {exc.what} {exc.ident}")
        return 1
    except service.PayloadPruned:
        complain("the event's payload was removed by retention")
        return 1
    except service.BrokerUnavailable as exc:
        complain(f"Redis did not take the message ({exc})")
        return 1
    except psycopg.OperationalError as exc:
        complain(f"PostgreSQL did not answer: {exc}")
        return 1
    finally:
        context.close()
