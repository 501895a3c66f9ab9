"""Which errors are the database's passing trouble, and which are the payload's fault.

``TransientError``: the delivery could not be applied now and may be later (PostgreSQL
down, busy, or asking to retry): the task retries it, bounded. ``refusal``: what the
database or psycopg refused for what the payload holds, the same every time: a dead
letter at once, with a short reason naming the problem and never quoting it (the
server's message text quotes the body). ``describe``: an error as ``last_error`` and the
log lines may show it.
"""

from __future__ import annotations

import traceback

import psycopg

from workers.delivery import UNSTORABLE

# psycopg_pool.PoolTimeout, SerializationFailure and DeadlockDetected are all
# OperationalErrors: the database is unreachable, busy, or asked us to try again. (So is
# class 54, program limit exceeded: ``refusal`` sorts that out first, as permanent.)
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (psycopg.OperationalError,)

STORAGE_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.Error,
    UnicodeError,
    RecursionError,
    OverflowError,
)
"""What storing a payload can raise; ``refusal`` says which of them are about the payload."""

PERMANENT_SQLSTATE_CLASSES = {
    "22": "data exception",
    "23": "integrity constraint violation",
    "54": "program limit exceeded",
}
"""SQLSTATE classes the database answers for what a payload holds: the same every time."""


class TransientError(Exception):
    """The delivery could not be applied now; trying again later may work."""


def refusal(exc: BaseException) -> str | None:
    """The short reason the database or psycopg refused what a payload holds; None when
    ``exc`` is not about the payload (a transient fault, or a bug).

    Names the problem, never quotes it: the server's message text quotes the body.
    """
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate
        if state:
            kind = PERMANENT_SQLSTATE_CLASSES.get(state[:2])
            if kind is None:
                return None
            return f"rejected by the database: SQLSTATE {state} (class {state[:2]}, {kind})"
        # Raised by psycopg itself, before sending: its own fixed text, never the payload.
        if isinstance(exc, psycopg.DataError):
            what = "a NUL character in a string" if "NUL" in str(exc) else "a value psycopg refuses"
            return f"not storable: {what} (DataError)"
        if isinstance(exc, psycopg.ProgrammingError) and str(exc).startswith("cannot adapt"):
            return "not storable: a value psycopg cannot adapt (ProgrammingError)"
        return None
    if isinstance(exc, UnicodeEncodeError):
        return "not storable: lone surrogate in a string (UnicodeEncodeError)"
    if isinstance(exc, UnicodeDecodeError):
        return "not storable: invalid UTF-8 (UnicodeDecodeError)"
    if isinstance(exc, RecursionError):
        return "not storable: nested too deeply (RecursionError)"
    if isinstance(exc, OverflowError):
        return "not storable: a date or number out of range (OverflowError)"
    return None


def describe(exc: BaseException) -> str:
    """A short text of an error for ``last_error`` and log lines: the server's message only
    when it cannot quote a payload (client-side faults: connection, pool timeout)."""
    name = type(exc).__name__
    if isinstance(exc, psycopg.Error):
        if exc.sqlstate:
            return f"{name} (SQLSTATE {exc.sqlstate})"
        return UNSTORABLE.sub("\ufffd", f"{name}: {exc}")[:500]
    if isinstance(exc, TransientError):
        return str(exc)
    return name


def where(exc: BaseException) -> str:
    """The innermost frame of a traceback, ``module:line function`` (no values)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown"
    frame = frames[-1]
    return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}"
