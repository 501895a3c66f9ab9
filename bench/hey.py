"""What ``bench.receiver`` reads from ``hey``: its summary and its CSV records, as runs."""

from __future__ import annotations

import csv
import re
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    codes: dict[int, int]
    errors: list[str] = field(default_factory=list)
    queued: int | None = None
    copies: int | None = None
    """Copies in the accepted set (one per 202: no worker runs here to forget them)."""
    web_cpu_us: float = 0.0
    """CPU time (user + system) of gunicorn's processes per answered request."""
    redis_cpu_us: float = 0.0
    hey_cpu_us: float = 0.0
    """CPU time of the load generator (hey) per answered request: on a shared machine it
    competes for the same cores."""

    @property
    def accepted(self) -> int:
        return self.codes.get(202, 0)

    def problems(self, label: str, expected: int | None) -> list[str]:
        found = []
        if set(self.codes) != {202} or self.errors:
            found.append(f"{label}: answers {self.codes}, errors {self.errors[:3]}")
        if expected is not None and self.accepted != expected:
            found.append(f"{label}: {self.accepted} answered 202 of {expected} sent")
        if self.queued is not None and self.queued != self.accepted:
            found.append(f"{label}: {self.accepted} answered 202, {self.queued} in Redis")
        if self.copies is not None and self.copies != self.accepted:
            found.append(f"{label}: {self.accepted} answered 202, {self.copies} accepted copies")
        return found


def check_hey() -> None:
    if shutil.which("hey") is None:
        sys.exit(
            "bench.receiver: the load generator 'hey' is not installed.\n"
            "  Debian/Ubuntu: apt-get update && apt-get install -y hey\n"
            "  elsewhere:     go install github.com/rakyll/hey@latest"
        )


def parse_summary(output: str) -> Run:
    """hey's default summary output."""

    def number(pattern: str) -> float:
        match = re.search(pattern, output)
        if match is None:
            raise RuntimeError(f"cannot read {pattern!r} in hey's output:\n{output}")
        return float(match.group(1))

    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", output)}
    errors = []
    if "Error distribution:" in output:
        tail = output.split("Error distribution:", 1)[1]
        errors = [line.strip() for line in tail.splitlines() if line.strip()]
    return Run(
        rps=number(r"Requests/sec:\s+([\d.]+)"),
        p50_ms=number(r"50% in ([\d.]+) secs") * 1000,
        p99_ms=number(r"99% in ([\d.]+) secs") * 1000,
        codes=codes,
        errors=errors,
    )


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile, as hey computes its own."""
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def csv_run(outputs: list[Path], sent: int, elapsed: float) -> Run:
    """One run from the ``hey -o csv`` records of several senders (each file then removed),
    ``sent`` requests in all over ``elapsed`` seconds."""
    latencies: list[float] = []
    codes: dict[int, int] = {}
    for path in outputs:
        with path.open() as handle:
            for row in csv.DictReader(handle):
                latencies.append(float(row["response-time"]) * 1000)
                code = int(row["status-code"])
                codes[code] = codes.get(code, 0) + 1
        path.unlink()
    latencies.sort()
    missing = sent - len(latencies)  # hey's csv lists answered requests only
    return Run(
        rps=len(latencies) / elapsed,
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        codes=codes,
        errors=[f"{missing} requests without an answer"] if missing else [],
    )


def median_run(runs: list[Run]) -> Run:
    if len(runs) == 1:
        return runs[0]
    codes: dict[int, int] = {}
    for run in runs:
        for code, count in run.codes.items():
            codes[code] = codes.get(code, 0) + count
    return Run(
        rps=statistics.median(r.rps for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        codes=codes,
        queued=None if runs[0].queued is None else sum(r.queued or 0 for r in runs),
        web_cpu_us=statistics.median(r.web_cpu_us for r in runs),
        redis_cpu_us=statistics.median(r.redis_cpu_us for r in runs),
        hey_cpu_us=statistics.median(r.hey_cpu_us for r in runs),
    )
