"""A `bughunt ci` matrix spread over a CI system's own job matrix: `bughunt ci MATRIX --shard K/N` runs shard K's
cells and writes, beside its junit.xml, summary.md, index.html and reports, a shard document (`shard.json`);
`bughunt ci merge DIR...` checks that the documents are the N shards of one run and writes the one summary.md,
junit.xml, index.html and exit code the unsharded run would have (0 pass, 1 regression, 2 bad input).

Which cells a shard runs (`bughunt.ci.run.assign_shards`): whole checkpoint-device groups, contiguous in matrix order,
about 1/N of the cells each. A group is never split, because its cells share one compare run (each checkpoint is
loaded once per implementation and the float64 reference runs once) and one report. So a matrix spreads over at
most as many shards as it has checkpoint-device groups; further shards run nothing and say so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bughunt.ci.baseline import Cell, cells_of
from bughunt.ci.judge import Violation
from bughunt.ci.matrix import Matrix, Threshold
from bughunt.ci.outcome import CellOutcome, CiRun
from bughunt.ci.outputs import write_file, write_outputs
from bughunt.ci.run import assign_shards, run_ci
from bughunt.errors import BughuntError
from bughunt.implementations import ImplChoice
from bughunt.output import check_output_dir, write_output_dir

SHARD_FILE = "shard.json"
SHARD_SCHEMA = "bughunt.ci-shard"
SHARD_SCHEMA_VERSION = 1


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N), with 1 <= K <= N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise BughuntError(f"--shard '{text}' is not K/N. Write the shard's number and the shard count, e.g. --shard 2/4 "
                           "(K counts from 1).")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= k <= n:
        raise BughuntError(f"--shard {text}: K must be between 1 and N (N at least 1), e.g. --shard 1/{max(n, 1)} to "
                           f"--shard {max(n, 1)}/{max(n, 1)}.")
    return k, n


# ------------------------------------------------------------------------------------------------
# The shard document
# ------------------------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class _Impl(_Strict):
    name: str
    dtype: str | None
    python: str | None
    toggles: tuple[tuple[str, str], ...]
    version: str | None = None


class _Cell(_Strict):
    checkpoint: str
    impl: _Impl
    device: str
    reference: _Impl


class _Violation(_Strict):
    point: str
    detail: str


class _Outcome(_Strict):
    cell: _Cell
    status: Literal["pass", "fail", "error", "skipped"]
    violations: tuple[_Violation, ...]
    error: str | None
    diagnosis: str | None
    report: str | None
    seconds: float
    max_rel_l2: float | None
    max_rel_l2_baseline: float | None


class _Threshold(_Strict):
    index: int
    metric: str
    points: str
    cells: str
    summary: str | None
    max: float | None
    min: float | None
    floor_factor: float | None
    baseline_factor: float | None
    slack: float


class _Group(_Strict):
    name: str
    cells: tuple[str, ...]


class _Run(_Strict):
    """What every shard of one run shares: the same matrix file, baselines and plan."""
    source: str
    sha256: str
    baseline_dir: str
    update_baseline: bool
    groups: tuple[_Group, ...]
    thresholds: tuple[_Threshold, ...]


class _ShardIndex(_Strict):
    index: int
    count: int


class ShardDocument(_Strict):
    schema_: Literal["bughunt.ci-shard"] = Field(alias="schema")
    schema_version: Literal[1]
    shard: _ShardIndex
    run: _Run
    packages: dict[str, str]
    seconds: float
    outcomes: tuple[_Outcome, ...]
    stale_baselines: tuple[str, ...]
    written_baselines: tuple[str, ...]


def _groups(matrix: Matrix) -> list[dict]:
    """The checkpoint-device groups in run order, as `bughunt.ci.run._plan` forms them, without touching a checkpoint."""
    return [{"name": f"{entry.name}-{device}", "cells": [c.id for c in cells_of(entry) if c.device == device]}
            for entry in matrix.checkpoints for device in entry.devices]


def shard_document(run: CiRun) -> dict:
    assert run.shard is not None
    return {
        "schema": SHARD_SCHEMA, "schema_version": SHARD_SCHEMA_VERSION,
        "shard": {"index": run.shard[0], "count": run.shard[1]},
        "run": {"source": str(run.matrix.source), "sha256": hashlib.sha256(run.matrix.source.read_bytes()).hexdigest(),
                "baseline_dir": str(run.baseline_dir), "update_baseline": run.update_baseline, "groups": _groups(run.matrix),
                "thresholds": [dataclasses.asdict(t) for t in run.matrix.thresholds]},
        "packages": run.packages,
        "seconds": run.seconds,
        "outcomes": [{"cell": {"checkpoint": o.cell.checkpoint, "impl": dataclasses.asdict(o.cell.impl), "device": o.cell.device,
                               "reference": dataclasses.asdict(o.cell.reference)},
                      "status": o.status, "violations": [{"point": v.point, "detail": v.detail} for v in o.violations],
                      "error": o.error, "diagnosis": o.diagnosis, "report": o.report, "seconds": o.seconds,
                      "max_rel_l2": o.max_rel_l2, "max_rel_l2_baseline": o.max_rel_l2_baseline} for o in run.outcomes],
        "stale_baselines": [p.name for p in run.stale_baselines],
        "written_baselines": [str(p) for p in run.written_baselines],
    }


def run_shard(matrix_path: str | Path, baseline_dir: str | Path, shard: tuple[int, int], update_baseline: bool = False,
              out: str | Path | None = None, log: Callable[[str], None] = print) -> CiRun:
    """`run_ci` on shard K of N, then its shard document beside the other outputs."""
    def finish(run: CiRun, directory: Path) -> None:  # inside the output, before it is moved into place
        write_file(directory / SHARD_FILE, json.dumps(shard_document(run), indent=1, sort_keys=True) + "\n")

    return run_ci(matrix_path, baseline_dir, update_baseline=update_baseline, out=out, log=log, shard=shard, finish=finish)


# ------------------------------------------------------------------------------------------------
# Merging
# ------------------------------------------------------------------------------------------------

def read_shard(directory: Path) -> ShardDocument:
    path = directory / SHARD_FILE
    if not directory.is_dir():
        raise BughuntError(f"{directory} is not a directory. Pass the --out directories of `bughunt ci MATRIX --shard K/N` runs.")
    if not path.is_file():
        raise BughuntError(f"{directory} has no {SHARD_FILE}, so it is not the output of a sharded run. "
                           "Pass the --out directory of each `bughunt ci MATRIX --shard K/N` run (keep the whole directory in the artifact).")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BughuntError(f"cannot read {path}: {e}. Download the shard's artifact again.") from None
    try:
        doc = ShardDocument.model_validate_json(text)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "the document"
        found = "" if first["type"] == "json_invalid" else f" (found {first.get('input')!r:.80})"
        more = f", and {e.error_count() - 1} more problems" if e.error_count() > 1 else ""
        raise BughuntError(f"{path} is not a valid bughunt shard document: {where}: {first['msg']}{found}{more}. "
                           "It must be the shard.json a `bughunt ci --shard K/N` run wrote; run that shard again.") from None
    if not 1 <= doc.shard.index <= doc.shard.count:
        raise BughuntError(f"{path} is not a valid bughunt shard document: shard {doc.shard.index} of {doc.shard.count} is out of range. "
                           "Run that shard again.")
    return doc


def _same_run(docs: list[tuple[Path, ShardDocument]]) -> None:
    (d0, first) = docs[0]
    labels = {"source": "matrix files", "sha256": "matrix files' contents", "baseline_dir": "baseline directories",
              "update_baseline": "--update-baseline settings", "groups": "cells", "thresholds": "thresholds"}
    for d, doc in docs[1:]:
        if doc.shard.count != first.shard.count:
            raise BughuntError(f"{d0} is shard {first.shard.index} of {first.shard.count} but {d} is shard {doc.shard.index} of "
                               f"{doc.shard.count}. Merge the shards of one run, all cut with the same N.")
        for key, what in labels.items():
            a, b = getattr(first.run, key), getattr(doc.run, key)
            if a != b:
                shown = "" if key in ("groups", "thresholds") else f" ({a!r} vs {b!r})"
                raise BughuntError(f"{d0} and {d} are shards of different runs: their {what} differ{shown}. "
                                   "Merge the shards of one `bughunt ci` matrix run.")


def _check_cover(docs: list[tuple[Path, ShardDocument]]) -> None:
    count = docs[0][1].shard.count
    seen: dict[int, Path] = {}
    for d, doc in docs:
        if doc.shard.index in seen:
            raise BughuntError(f"{seen[doc.shard.index]} and {d} are both shard {doc.shard.index} of {count}. Pass each shard once.")
        seen[doc.shard.index] = d
    missing = [k for k in range(1, count + 1) if k not in seen]
    if missing:
        raise BughuntError(f"shard{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {count} "
                           f"{'are' if len(missing) > 1 else 'is'} missing: got {len(docs)} of {count}. Pass every shard's directory.")
    groups = docs[0][1].run.groups
    owner = assign_shards([len(g.cells) for g in groups], count)
    for d, doc in docs:
        want = [c for g, k in zip(groups, owner) if k == doc.shard.index for c in g.cells]
        got = [_outcome(o).cell.id for o in doc.outcomes]
        if got != want:
            raise BughuntError(f"{d / SHARD_FILE}: shard {doc.shard.index} of {count} should hold cells {want} but holds {got}. "
                               "The document was edited or comes from another bughunt version; run that shard again.")


def _outcome(o: _Outcome) -> CellOutcome:
    c = o.cell
    cell = Cell(c.checkpoint, ImplChoice(**c.impl.model_dump()), c.device, ImplChoice(**c.reference.model_dump()))
    return CellOutcome(cell, o.status, [Violation(v.point, v.detail) for v in o.violations], error=o.error, diagnosis=o.diagnosis,
                       report=o.report, seconds=o.seconds, max_rel_l2=o.max_rel_l2, max_rel_l2_baseline=o.max_rel_l2_baseline)


def _packages(docs: list[tuple[Path, ShardDocument]]) -> dict[str, str]:
    """The library versions; where shards ran different versions, each version with the shards that ran it."""
    out: dict[str, str] = {}
    for name in dict.fromkeys(k for _, doc in docs for k in doc.packages):
        by_version: dict[str, list[int]] = {}
        for _, doc in sorted(docs, key=lambda x: x[1].shard.index):
            by_version.setdefault(doc.packages.get(name, "absent"), []).append(doc.shard.index)
        out[name] = next(iter(by_version)) if len(by_version) == 1 else \
            ", ".join(f"{v} (shard{'s' if len(ks) > 1 else ''} {', '.join(map(str, ks))})" for v, ks in by_version.items())
    return out


def merge(directories: list[str | Path], out: str | Path | None = None, log: Callable[[str], None] = print) -> CiRun:
    """Combine the shard directories of one sharded run into one summary.md, junit.xml, index.html (with the reports
    copied beside it) and exit code. Everything is checked before anything is written."""
    dirs = [Path(d) for d in directories]
    out = Path(out) if out is not None else Path("reports") / "ci"
    docs = [(d, read_shard(d)) for d in dirs]
    for d in dirs:
        if out.resolve() == d.resolve():
            raise BughuntError(f"--out {out} is one of the shard directories; merging there would overwrite that shard's "
                               "summary. Choose another --out.")
    check_output_dir(out, "ci", [("a shard directory", d) for d in dirs])  # not a shard, not inside or around one
    _same_run(docs)
    _check_cover(docs)
    docs.sort(key=lambda x: x[1].shard.index)
    reports = []
    for d, doc in docs:
        for rel in sorted({o.report for o in doc.outcomes if o.report}):
            parts = Path(rel).parts
            if Path(rel).is_absolute() or len(parts) != 3 or parts[0] != "reports" or ".." in parts:
                raise BughuntError(f"{d / SHARD_FILE}: report path {rel!r} is not reports/<group>/<file>. "
                                   "The document was edited; run that shard again.")
            source = (d / rel).parent
            if not (d / rel).is_file():
                raise BughuntError(f"{d} lacks {rel}, the report of shard {doc.shard.index}'s cells. "
                                   "Upload each shard's whole --out directory as its artifact.")
            reports.append((source, Path(rel).parent))
    first = docs[0][1].run
    matrix = Matrix(source=Path(first.source), checkpoints=(),
                    thresholds=tuple(Threshold(**t.model_dump()) for t in first.thresholds))
    outcomes = [_outcome(o) for _, doc in docs for o in doc.outcomes]
    baseline_dir = Path(first.baseline_dir)
    stale = sorted({baseline_dir / name for _, doc in docs for name in doc.stale_baselines})
    run = CiRun(matrix, baseline_dir, out, first.update_baseline, outcomes, max(doc.seconds for _, doc in docs),
                stale_baselines=stale, packages=_packages(docs))
    def write(tmp: Path) -> None:
        for source, target in reports:
            shutil.copytree(source, tmp / target, dirs_exist_ok=True)
        write_outputs(run, tmp)

    write_output_dir(out, "ci", write, [("a shard directory", d) for d in dirs])
    for o in run.failed:
        log(o.details)
    log(f"{len(outcomes) - len(run.failed)}/{len(outcomes)} cells pass, {len(run.failed)} fail, over {len(docs)} shards "
        f"(slowest {run.seconds:.1f}s); wrote {out}/summary.md, {out}/junit.xml, {out}/index.html")
    return run

