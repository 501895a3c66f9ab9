"""What every process entry module does first: settings from the environment, or one line.

A missing or bad variable prints ``<process>: configuration error: <VARIABLE>: <problem>``
to stderr and exits with status 2, before anything is started. Nothing here starts a
server: ``DATABASE_URL`` and ``REDIS_URL`` are required (``scripts/dev`` supplies embedded
local ones for local runs).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

from config.settings import Settings, SettingsError


def check_settings(process: str, environ: Mapping[str, str]) -> Settings:
    """The settings as the environment gives them, or exit 2 with one line naming the
    variable (the web process also needs ``VOUCHERIFY_WEBHOOK_SECRET``)."""
    try:
        settings = Settings.from_env(environ)
        if process == "web":
            settings.require_webhook_secrets()
    except SettingsError as exc:
        print(f"{process}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return settings


load_settings = check_settings
"""The name the entry modules use: the checked settings, nothing started."""
