"""``.env.example`` lists every variable ``Settings.from_env`` reads, with its default (the
two URLs, which have none, are shown commented out and said to be required)."""

from __future__ import annotations

import re
from typing import Any

from config.settings import Settings
from tests.conftest import ROOT

LINE = re.compile(r"^(# )?([A-Z][A-Z0-9_]*)=(.*)$")
# The variables without a default (valid DSNs, never contacted).
URLS = {
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:9/unused",
    "REDIS_URL": "redis://127.0.0.1:9/0",
}


class RecordingEnviron(dict[str, str]):
    """An environment of only the required URLs that records which variables were asked for."""

    def __init__(self) -> None:
        super().__init__(URLS)
        self.asked: list[str] = []

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.append(key)
        return super().get(key, default)


def example() -> tuple[dict[str, str], set[str]]:
    """The example's active assignments, and the variables it shows commented out."""
    active: dict[str, str] = {}
    commented: set[str] = set()
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = LINE.match(line)
        if match:
            if match.group(1):
                commented.add(match.group(2))
            else:
                active[match.group(2)] = match.group(3)
    return active, commented


def test_every_settings_variable_is_listed() -> None:
    environ = RecordingEnviron()
    Settings.from_env(environ)
    active, commented = example()
    assert environ.asked  # from_env reads through .get
    assert set(environ.asked) <= set(active) | commented
    assert not set(active) & commented


def test_each_listed_variable_has_a_comment_line_above_it() -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    for number, line in enumerate(lines):
        if LINE.match(line):
            above = lines[number - 1]
            assert above.startswith("# "), line
            assert not LINE.match(above), line


def test_listed_values_are_the_defaults() -> None:
    active, _ = example()
    assert not set(URLS) & set(active)  # no default to show: an active line would be a guess
    assert Settings.from_env({**active, **URLS}) == Settings.from_env(URLS)


def test_the_required_urls_are_said_to_be_required_and_where_local_ones_come_from() -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    for variable in URLS:
        number = lines.index(f"# {variable}=")
        comment = lines[number - 1]
        assert "Required" in comment, comment
        assert "scripts/dev" in comment, comment
