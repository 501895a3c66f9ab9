"""Plots of ack latency and end-to-end lag over time, for the README's figures.

    .venv/bin/python -m bench.figures [--artifacts tests/artifacts] [--out docs/figures]

Redraws ``docs/figures/under_fire.png`` from the records the fault suite leaves in
``tests/artifacts/`` (``under_fire_requests.csv``, ``under_fire_lag.csv``,
``under_fire_faults.csv``). ``bench.load`` calls ``plot_run`` for its own run and then this
module for the fault run, so one command makes both.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
FIGURES = ROOT / "docs" / "figures"


@dataclass
class Records:
    """One run's records, times in seconds since its sender started."""

    requests: list[tuple[float, float, int]] = field(default_factory=list)
    """(sent at, ack ms, status; 0 = no answer)"""
    lags: list[tuple[float, float]] = field(default_factory=list)
    """(received at, lag ms) per event"""
    faults: list[tuple[str, float, float]] = field(default_factory=list)
    """(name, start, end)"""


def read_fault_run(folder: Path) -> Records:
    records = Records()
    with (folder / "under_fire_requests.csv").open() as handle:
        for row in csv.DictReader(handle):
            records.requests.append((float(row["t_s"]), float(row["ack_ms"]), int(row["status"])))
    with (folder / "under_fire_lag.csv").open() as handle:
        for row in csv.DictReader(handle):
            records.lags.append((float(row["received_t_s"]), float(row["lag_ms"])))
    faults = folder / "under_fire_faults.csv"
    if faults.exists():
        with faults.open() as handle:
            for row in csv.DictReader(handle):
                records.faults.append((row["fault"], float(row["start_s"]), float(row["end_s"])))
    return records


def _binned(points: Sequence[tuple[float, float]], width: float) -> tuple[list[float], ...]:
    """Per bin of ``width`` seconds: centre, p50, p99 (NaN across empty bins: a gap)."""
    bins: dict[int, list[float]] = defaultdict(list)
    for t, value in points:
        bins[int(t // width)].append(value)
    centres: list[float] = []
    p50: list[float] = []
    p99: list[float] = []
    previous = None
    for key in sorted(bins):
        if previous is not None and key > previous + 1:
            centres.append((previous + 1) * width)
            p50.append(math.nan)
            p99.append(math.nan)
        previous = key
        values = sorted(bins[key])
        centres.append((key + 0.5) * width)
        p50.append(values[len(values) // 2])
        p99.append(values[min(len(values) - 1, int(len(values) * 0.99))])
    return centres, p50, p99


def plot_run(records: Records, title: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (ack_ax, lag_ax) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True, dpi=100)
    span = max((t for t, _, _ in records.requests), default=1.0)
    width = max(0.5, span / 150)
    _plot_acks(ack_ax, records.requests, width)
    _plot_lags(lag_ax, records.lags, width)
    _mark_faults(ack_ax, lag_ax, records.faults, width)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _plot_acks(ax: Axes, requests: list[tuple[float, float, int]], width: float) -> None:
    ok = [(t, ms) for t, ms, status in requests if 200 <= status < 300]
    refused = [(t, ms) for t, ms, status in requests if status == 0]
    unavailable = [(t, ms) for t, ms, status in requests if status == 503]
    other = [(t, ms) for t, ms, status in requests if status not in (0, 503) and status >= 300]
    ax.scatter(*zip(*ok, strict=True), s=2, color="#9ab", label="202", rasterized=True)
    for points, colour, label in (
        (unavailable, "#e80", "503 (sent again)"),
        (refused, "#c22", "no answer (sent again)"),
        (other, "#708", "other status"),
    ):
        if points:
            ax.scatter(*zip(*points, strict=True), s=8, color=colour, label=label)
    centres, p50, p99 = _binned(ok, width)
    ax.plot(centres, p50, color="#136", linewidth=1, label="p50")
    ax.plot(centres, p99, color="#136", linewidth=1, linestyle="--", label="p99")
    ax.set_yscale("log")
    ax.set_ylabel("ack latency (ms)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, markerscale=2)


def _plot_lags(ax: Axes, lags: list[tuple[float, float]], width: float) -> None:
    if lags:
        ax.scatter(*zip(*lags, strict=True), s=2, color="#ab9", rasterized=True)
        centres, p50, p99 = _binned(lags, width)
        ax.plot(centres, p50, color="#361", linewidth=1, label="p50")
        ax.plot(centres, p99, color="#361", linewidth=1, linestyle="--", label="p99")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("end-to-end lag (ms)\nreceived → processed")
    ax.set_xlabel("seconds since the first delivery was sent (x: when it reached the receiver)")


def _mark_faults(
    ack_ax: Axes, lag_ax: Axes, faults: list[tuple[str, float, float]], width: float
) -> None:
    for name, start, end in faults:
        for ax in (ack_ax, lag_ax):
            ax.axvspan(start, max(end, start + width / 2), color="#f4cccc", alpha=0.6, lw=0)
        ack_ax.annotate(
            name,
            (start, 1),
            xycoords=("data", "axes fraction"),
            xytext=(2, -2),
            textcoords="offset points",
            fontsize=7,
            va="top",
            rotation=90,
        )


def plot_fault_run(artifacts: Path = ARTIFACTS, out_dir: Path = FIGURES) -> Path | None:
    if not (artifacts / "under_fire_requests.csv").exists():
        return None
    records = read_fault_run(artifacts)
    title = (
        f"Under fire: {len(records.requests)} requests, {len(records.lags)} events "
        "(tests/fault/test_under_fire.py)"
    )
    return plot_run(records, title, out_dir / "under_fire.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, default=ARTIFACTS)
    parser.add_argument("--out", type=Path, default=FIGURES)
    args = parser.parse_args()
    path = plot_fault_run(args.artifacts, args.out)
    if path is None:
        raise SystemExit(
            f"no records in {args.artifacts}: run "
            ".venv/bin/python -m pytest tests/fault/test_under_fire.py first"
        )
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
