"""What a ci run produced, as typed records: each cell's outcome and the run as a whole. The outputs, the shard
documents and the exit code are all written from these, so a run's verdict can be saved and merged later."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bughunt.ci.baseline import Cell
from bughunt.ci.judge import Violation
from bughunt.ci.matrix import Matrix


@dataclass
class CellOutcome:
    cell: Cell
    status: str  # pass | fail | error (the implementation or the run failed) | skipped (it does not run the family)
    violations: list[Violation] = field(default_factory=list)
    error: str | None = None
    diagnosis: str | None = None
    report: str | None = None  # report.html, relative to the output directory
    seconds: float = 0.0
    max_rel_l2: float | None = None
    max_rel_l2_baseline: float | None = None
    comparison: dict | None = field(default=None, repr=False)  # what a recorded baseline is made from

    @property
    def message(self) -> str:
        if self.status == "error":
            return f"cell {self.cell.id}: {self.error}"
        if self.status == "skipped":
            return f"cell {self.cell.id}: skipped: {self.error}"
        if self.status == "pass":
            return f"cell {self.cell.id}: pass"
        first = self.violations[0]
        more = f" (+{len(self.violations) - 1} more)" if len(self.violations) > 1 else ""
        return f"cell {self.cell.id}: {first.text}{more}"

    @property
    def details(self) -> str:
        lines = [self.message]
        if self.status == "fail":
            lines += [f"  {v.text}" for v in self.violations[:50]]
            if len(self.violations) > 50:
                lines.append(f"  ... and {len(self.violations) - 50} more")
        if self.diagnosis:
            lines.append(f"diagnosis: {self.diagnosis}")
        if self.report:
            lines.append(f"report: {self.report}")
        return "\n".join(lines)


@dataclass
class CiRun:
    matrix: Matrix
    baseline_dir: Path
    out: Path
    update_baseline: bool
    outcomes: list[CellOutcome]
    seconds: float
    written_baselines: list[Path] = field(default_factory=list)
    stale_baselines: list[Path] = field(default_factory=list)
    shard: tuple[int, int] | None = None  # (K, N): this run is shard K of N (see bughunt.ci.shard)
    packages: dict[str, str] = field(default_factory=dict)  # library versions the summary names

    @property
    def failed(self) -> list[CellOutcome]:
        return [o for o in self.outcomes if o.status not in ("pass", "skipped")]

    @property
    def exit_code(self) -> int:
        """0 every cell passes; 1 a regression (or a failed cell among compared ones); 2 nothing could be compared."""
        if self.outcomes and all(o.status in ("error", "skipped") for o in self.outcomes):
            return 2
        return 1 if self.failed else 0
