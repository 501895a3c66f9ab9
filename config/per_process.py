"""One object per process and per key, made on first use in the process that uses it.

The web and worker processes fork (gunicorn, Celery's prefork pool) after their modules
are imported: a connection pool or socket made before the fork must never be used in a
child. ``PerProcess`` holds what a process made, keyed by what the caller asks for (a
URL, say), and makes it again when the process id changed; the parent's copy is left
alone (closing it from the child would close the parent's sockets). Asked again for the
same key with other parameters, it refuses (``ValueError``) instead of silently handing
back what the first caller asked for.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class _Made(Generic[T]):
    pid: int
    params: dict[str, Any]
    value: T


class PerProcess(Generic[T]):
    """``get(key, **params)``: this process's object for ``key``, made by
    ``make(key, **params)`` on the first call; ``close()``: close this process's objects
    with ``close`` and forget them."""

    def __init__(
        self, name: str, make: Callable[..., T], close: Callable[[T], None] | None = None
    ) -> None:
        self.name = name
        self._make = make
        self._close = close
        self._lock = threading.Lock()
        self._made: dict[Hashable, _Made[T]] = {}

    def get(self, key: Hashable, **params: Any) -> T:
        pid = os.getpid()
        made = self._made.get(key)
        if made is None or made.pid != pid:
            with self._lock:
                made = self._made.get(key)
                if made is None or made.pid != pid:  # none yet, or the parent's: make ours
                    made = self._made[key] = _Made(pid, params, self._make(key, **params))
        if made.params != params:
            raise ValueError(
                f"{self.name} for {key!r} was made with {made.params} in this process,"
                f" and is now asked for with {params}: one set of parameters per process"
            )
        return made.value

    def close(self) -> None:
        """Close what this process made (never the parent's) and forget everything."""
        with self._lock:
            made, self._made = self._made, {}
        for each in made.values():
            if self._close is not None and each.pid == os.getpid():
                self._close(each.value)
