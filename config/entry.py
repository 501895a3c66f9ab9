"""What every process entry module does first: settings from the environment, or one line.

A bad or missing variable prints ``<process>: configuration error: <VARIABLE>: <problem>``
to stderr and exits with status 2, before anything is started.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from config.settings import Settings, SettingsError

LOCAL_DATA_DIR = "LOCAL_DATA_DIR"


def check_settings(process: str, environ: Mapping[str, str]) -> Settings:
    """The settings as the environment gives them (no embedded servers started), or exit 2."""
    try:
        settings = Settings.from_env(environ)
        if process == "web":
            settings.require_webhook_secrets()
    except SettingsError as exc:
        print(f"{process}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return settings


def load_settings(process: str, environ: Mapping[str, str]) -> Settings:
    settings = check_settings(process, environ)
    try:
        if not (settings.database_url and settings.redis_url):
            settings = with_local_defaults(settings, Path(environ.get(LOCAL_DATA_DIR) or ".local"))
    except SettingsError as exc:
        print(f"{process}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return settings


def with_local_defaults(settings: Settings, root: Path) -> Settings:
    """Fill a missing ``DATABASE_URL`` / ``REDIS_URL`` with the embedded local servers.

    Local runs only: settings that name both URLs are returned unchanged and nothing is
    started, so a production process never touches the embedded servers.
    """
    if settings.database_url and settings.redis_url:
        return settings
    from config.local_servers import EmbeddedServerError, ensure_local_servers

    try:
        database_url, redis_url = ensure_local_servers(root)
    except EmbeddedServerError as exc:
        variable = "DATABASE_URL" if not settings.database_url else "REDIS_URL"
        raise SettingsError(variable, f"not set, and the embedded server failed: {exc}") from exc
    return settings.with_urls(
        settings.database_url or database_url, settings.redis_url or redis_url
    )
