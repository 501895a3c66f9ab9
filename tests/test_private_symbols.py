"""No private symbol of a library is used outside ``compat/`` (issue 25): every
``obj._name`` attribute access and ``from lib import _name`` in the production packages is
on our own objects, or named below with the reason it is allowed."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION = ("config", "schemas", "workers", "receiver", "ops", "web", "migrations")

ALLOWED = {
    "_replace": "namedtuple's public method (urllib.parse results are named tuples)",
}
"""Private-looking names that are public APIs, and why."""

ATTRIBUTE = re.compile(r"(\w+)\.(_[a-z]\w*)")
IMPORT = re.compile(r"^\s*from\s+[\w.]+\s+import\s+.*\b(_[a-z]\w*)", re.M)


def uses() -> list[str]:
    found = []
    for package in PRODUCTION:
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text()
            where = path.relative_to(ROOT)
            for owner, name in ATTRIBUTE.findall(text):
                if owner not in ("self", "cls") and name not in ALLOWED:
                    found.append(f"{where}: {owner}.{name}")
            found.extend(f"{where}: import {name}" for name in IMPORT.findall(text))
    return found


def test_no_private_symbol_of_a_library_is_used_outside_compat() -> None:
    assert uses() == []


def test_the_check_finds_what_it_is_for() -> None:
    sample = "request.message._state = 'ACK'\nfrom kombu.transport import _transport_cache\n"
    assert ATTRIBUTE.findall(sample) == [("message", "_state")]
    assert IMPORT.findall(sample) == ["_transport_cache"]
