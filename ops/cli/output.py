"""How ``vfy-pipeline`` writes: JSON for machines (``--json``) or lines for people on
stdout, complaints on stderr."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from ops.params import dumps

PROG = "vfy-pipeline"


class Output:
    def __init__(self, as_json: bool, out: TextIO) -> None:
        self.as_json = as_json
        self.out = out

    def line(self, text: str = "") -> None:
        print(text, file=self.out)

    def json(self, document: Any) -> None:
        print(dumps(document, pretty=True), file=self.out)

    def fields(self, row: Mapping[str, Any], keys: Sequence[str]) -> None:
        width = max(len(k) for k in keys)
        for key in keys:
            if key in row:
                self.line(f"  {key.ljust(width)}  {text(row[key])}")

    def table(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
        if not rows:
            self.line("  (none)")
            return
        cells = [[text(row.get(c)) for c in columns] for row in rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        self.line("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
        for r in cells:
            self.line("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())

    def section(
        self, title: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]
    ) -> None:
        """A blank line, ``title:`` and the rows as a table."""
        self.line()
        self.line(f"{title}:")
        self.table(rows, columns)

    def more(self, next_cursor: object) -> None:
        """How to ask for the next page, when there is one."""
        if next_cursor:
            self.line(f"more: --cursor {next_cursor}")


def text(value: Any) -> str:
    if value is None:
        return "-"
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    return str(value).replace("\n", " ")


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def complain(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)
