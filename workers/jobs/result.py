"""What one run of a job reports: counts, recorded in ``job_runs.result`` as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class JobResult:
    """Base of each job's result: a frozen dataclass of integer counts."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
