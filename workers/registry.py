"""Event type -> handler. A type registered twice fails at import; unknown types are ignored.

A handler takes the loaded event and the connection of the event's transaction and never
commits: the task owns the transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

Loader = Callable[[str, str, str | None, Any], Any]
"""(event_id, type, event.created_at, data) -> loaded event; raises ValidationError."""
Handler = Callable[[Any, psycopg.Connection[Any]], None]


class DuplicateHandlerError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Route:
    event_type: str
    load: Loader
    handle: Handler


class Registry:
    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}

    def handles(self, event_type: str, load: Loader) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            if event_type in self._routes:
                existing = self._routes[event_type].handle
                where = f"{existing.__module__}.{existing.__qualname__}"
                raise DuplicateHandlerError(f"{event_type!r} is already handled by {where}")
            self._routes[event_type] = Route(event_type, load, handler)
            return handler

        return register

    def route(self, event_type: str) -> Route | None:
        return self._routes.get(event_type)

    def types(self) -> list[str]:
        return sorted(self._routes)


registry = Registry()
handles = registry.handles
