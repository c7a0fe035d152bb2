"""Planning and running a ci matrix: every checkpoint, baseline and token input is read and checked first (`_plan`),
then each checkpoint-device group runs as one compare, its cells are judged, and the outputs (and, when asked, the
baselines) are written. `assign_shards` says which groups a shard K of N runs."""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bughunt.ci.baseline import BASELINE_SCHEMA, Cell, baseline_document, cells_of, dump_baseline, read_baseline
from bughunt.ci.judge import diagnosis_text, judge_cell
from bughunt.ci.matrix import CheckpointEntry, Matrix, load_matrix
from bughunt.ci.outcome import CellOutcome, CiRun
from bughunt.ci.outputs import write_outputs
from bughunt.errors import BughuntError
from bughunt.implementations import require_device
from bughunt.implementations.catalog import family_refusal
from bughunt.output import check_output_dir, check_output_file, write_output_dir, write_output_file

@dataclass
class _Group:
    """One compare run: a checkpoint on a device, every cell's implementation against the reference."""

    entry: CheckpointEntry
    device: str
    path: Path
    tokens: np.ndarray
    cells: list[Cell]
    baselines: dict[str, dict | None]
    text: Any = None  # the bughunt.text.EncodedText the tokens came from, recorded in the group's report
    skipped: dict[str, str] = field(default_factory=dict)  # cell id -> why its implementation does not run the family

    @property
    def name(self) -> str:
        return f"{self.entry.name}-{self.device}"


def _plan(matrix: Matrix, baseline_dir: Path, update: bool) -> list[_Group]:
    """Resolve checkpoints and tokens and read every baseline before anything runs, so bad input fails fast."""
    from bughunt.spec import load_spec
    from bughunt.trace import capture_points

    groups = []
    points_seen: dict[int, bool] = {}
    for entry in matrix.checkpoints:
        where = f"{matrix.source.name}: checkpoint {entry.name}"
        if entry.path is not None and not entry.path.is_dir():
            raise BughuntError(f"{where}: {entry.path} is not a directory. Fix path = (relative paths are relative to {matrix.source}).")
        path = entry.resolve()
        try:
            spec = load_spec(path)
            tokens, encoded = entry.tokens.encode(spec, path)
        except BughuntError as e:
            raise BughuntError(f"{where}: {e}") from None
        if tokens.max() >= spec.vocab_size:
            raise BughuntError(f"{where}: token id {tokens.max()} is outside the vocabulary [0, {spec.vocab_size}). Fix tokens.ids.")
        points = capture_points(spec.num_layers, matrix.branches)
        cells_all = cells_of(entry)
        for rule in matrix.thresholds:
            matched = [c for c in cells_all if fnmatch.fnmatchcase(c.id, rule.cells)]
            if matched and any(fnmatch.fnmatchcase(p, rule.points) for p in points):
                points_seen[rule.index] = True
        for device in entry.devices:
            require_device(device, f"{where}: devices")
            cells = [c for c in cells_all if c.device == device]
            skipped = {c.id: why for c in cells if (why := family_refusal(c.impl.name, c.impl.python, spec.family))}
            baselines = {c.id: None if update or c.id in skipped else read_baseline(
                baseline_dir / c.baseline_name, c, tokens, matrix.branches, matrix.source, baseline_dir) for c in cells}
            groups.append(_Group(entry, device, path, tokens, cells, baselines, encoded, skipped))
    for rule in matrix.thresholds:
        if rule.index not in points_seen:
            raise BughuntError(f"{matrix.source.name}: thresholds[{rule.index}] ({rule.describe()}) matches no capture point of any cell. "
                               "Fix points (capture points: embed, layer.{i}, layer.{i}.attn, layer.{i}.mlp, final_norm, logits) or cells (e.g. \"llama/hf:bf16/*\").")
    return groups


def assign_shards(sizes: list[int], count: int) -> list[int]:
    """The shard (1-based) of each checkpoint-device group, given each group's number of cells: contiguous runs of
    groups in matrix order, cut so each shard holds about 1/count of the cells (a group goes to the shard its middle
    cell falls in). A group never splits: its cells share one compare run (the reference runs once) and one report."""
    total = sum(sizes)
    out, before = [], 0
    for size in sizes:
        out.append(min(count, (count * (2 * before + size)) // (2 * total) + 1) if total else 1)
        before += size
    return out


def _ci_gate(outcomes: list[CellOutcome]) -> dict:
    """The group's verdicts as result.json keeps them (templates/sections/ci_gate.html draws them)."""
    return {"cells": [{"cell": o.cell.id, "status": o.status, "verdict": o.message} for o in outcomes]}


def _judge_group(group: _Group, matrix: Matrix, result, report_rel: str) -> list[CellOutcome]:
    """Each cell of a group that ran, judged against its baseline and the thresholds."""
    outcomes = []
    entries = {e["label"]: e for e in result.data["implementations"]}
    for cell in group.cells:
        if cell.id in group.skipped:
            outcomes.append(CellOutcome(cell, "skipped", error=group.skipped[cell.id]))
            continue
        entry = entries[cell.impl.label]
        timings = (entry.get("meta") or {}).get("timings") or {}
        seconds = float(timings.get("load_s", 0.0) + timings.get("forward_s", 0.0))
        diagnosis = diagnosis_text(result, cell.impl.label)
        if entry["status"] != "ok":
            outcomes.append(CellOutcome(cell, "error", error=f"{cell.impl.label} failed: {entry['error']}", diagnosis=diagnosis,
                                        report=report_rel, seconds=seconds))
            continue
        comparison = result.comparison(cell.impl.label)
        baseline = group.baselines[cell.id]
        violations = judge_cell(cell, comparison, baseline, matrix.thresholds)
        outcome = CellOutcome(cell, "fail" if violations else "pass", violations, diagnosis=diagnosis if violations else None,
                              report=report_rel, seconds=seconds, max_rel_l2=comparison["summary"]["max_rel_l2"], comparison=comparison)
        if baseline:
            outcome.max_rel_l2_baseline = max((p["rel_l2"] for p in baseline["points"] if p.get("rel_l2") is not None), default=None)
        outcomes.append(outcome)
    return outcomes


def _run_group(group: _Group, matrix: Matrix, out: Path, log: Callable[[str], None], pool=None) -> list[CellOutcome]:
    from bughunt import report
    from bughunt.comparison import compare

    labels = [c.impl.label for c in group.cells if c.id not in group.skipped] + [group.entry.reference.label]
    t0 = time.perf_counter()
    if len(labels) == 1:
        return [CellOutcome(c, "skipped", error=group.skipped[c.id]) for c in group.cells]
    try:
        result = compare(group.path, labels, reference=group.entry.reference.label, dtype=group.cells[0].dtype,
                         device=group.device, tokens=None if group.text is not None else group.tokens, out=None,
                         branches=matrix.branches, render=False, pool=pool, text=group.text,
                         generate=matrix.generate[0] if matrix.generate else None,
                         top_k=matrix.generate[1] if matrix.generate else 5)
    except BughuntError as e:
        return [CellOutcome(c, "error", error=f"the compare run failed: {e}", seconds=time.perf_counter() - t0) for c in group.cells]
    outcomes = _judge_group(group, matrix, result, f"reports/{group.name}/report.html")
    result.data["ci_gate"] = _ci_gate(outcomes)
    report_dir = out / "reports" / group.name
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "result.json").write_text(result.to_json())
    report.render(result, report_dir)
    log(f"  {group.name}: {sum(o.status == 'pass' for o in outcomes)}/{len(outcomes)} cells pass ({time.perf_counter() - t0:.1f}s)")
    return outcomes


def _check_outputs(matrix: Matrix, groups: list[_Group], baseline_dir: Path, out: Path, update: bool) -> tuple[list, list]:
    """Refuse an --out or --baseline that would overwrite something bughunt does not own; returns what each must not
    touch: (for --out, for --baseline)."""
    checkpoints = [("the checkpoint", g.path) for g in groups]
    protect = checkpoints + [("the matrix file", matrix.source), ("the baseline directory", baseline_dir)]
    check_output_dir(out, "ci", protect)
    baseline_protect = checkpoints + [("the --out directory", out)]
    if update:
        if baseline_dir.exists() and not baseline_dir.is_dir():
            raise BughuntError(f"--baseline {baseline_dir} is a file, not a directory. Give the directory that holds (or will hold) "
                               "the baseline files.")
        for g in groups:
            for c in g.cells:
                check_output_file(baseline_dir / c.baseline_name, BASELINE_SCHEMA, baseline_protect, "--baseline")
    return protect, baseline_protect


def _record_baselines(run: CiRun, groups: list[_Group], baseline_protect: list) -> None:
    """Each compared cell's baseline, replaced atomically, and only if it is a bughunt baseline (checked before)."""
    by_id = {c.id: g for g in groups for c in g.cells}
    for o in run.outcomes:
        if o.comparison is None:
            continue
        path = run.baseline_dir / o.cell.baseline_name
        write_output_file(path, dump_baseline(baseline_document(o.cell, o.comparison, by_id[o.cell.id].tokens, run.matrix.branches)),
                          BASELINE_SCHEMA, baseline_protect, "--baseline")
        run.written_baselines.append(path)


def _log_end(run: CiRun, log: Callable[[str], None]) -> None:
    for o in run.failed:
        log(o.details)
    if run.written_baselines:
        log(f"wrote {len(run.written_baselines)} baselines to {run.baseline_dir}; review the diff and commit them")
    if run.stale_baselines:
        log(f"note: {len(run.stale_baselines)} baseline files belong to no cell of this matrix: "
            f"{', '.join(p.name for p in run.stale_baselines)}. Delete them if the matrix dropped those cells.")
    out = run.out
    log(f"{len(run.outcomes) - len(run.failed)}/{len(run.outcomes)} cells pass, {len(run.failed)} fail ({run.seconds:.1f}s); "
        f"wrote {out}/summary.md, {out}/junit.xml, {out}/index.html")


def run_ci(matrix_path: str | Path, baseline_dir: str | Path, update_baseline: bool = False, out: str | Path | None = None,
           log: Callable[[str], None] = print, shard: tuple[int, int] | None = None,
           finish: Callable[[CiRun, Path], None] | None = None) -> CiRun:
    """Run every cell of the matrix, judge it, write the outputs (and, when asked, the baselines). Bad input raises
    BughuntError before anything runs; regressions are in the returned CiRun (exit_code 1). With `shard` = (K, N),
    run only shard K's cells (see `assign_shards`); the whole matrix is still checked, so every shard refuses the same
    bad input. The outputs are built in a temporary directory and moved to `out` when complete (bughunt.output);
    `finish(run, directory)` may add files of its own there first."""
    from bughunt import progress
    from bughunt.result import environment

    t0 = time.perf_counter()
    matrix = load_matrix(matrix_path)
    baseline_dir = Path(baseline_dir)
    if not update_baseline and not baseline_dir.is_dir():
        raise BughuntError(f"baseline directory {baseline_dir} does not exist. Record the baselines with "
                           f"`bughunt ci {matrix.source} --baseline {baseline_dir} --update-baseline`, review them and commit them.")
    out = Path(out) if out is not None else Path("reports") / "ci"
    groups = _plan(matrix, baseline_dir, update_baseline)
    protect, baseline_protect = _check_outputs(matrix, groups, baseline_dir, out, update_baseline)
    todo = groups if shard is None else [g for g, k in zip(groups, assign_shards([len(g.cells) for g in groups], shard[1])) if k == shard[0]]
    slice_ = "" if shard is None else f"shard {shard[0]}/{shard[1]}: {sum(len(g.cells) for g in todo)} of "
    log(f"bughunt ci: {slice_}{sum(len(g.cells) for g in groups)} cells from {matrix.source}"
        + (" (recording baselines)" if update_baseline else f", baselines in {baseline_dir}"))
    if shard is not None and not todo:
        log(f"note: shard {shard[0]}/{shard[1]} has no cells: each checkpoint and device runs whole in one shard, "
            f"and this matrix has {len(groups)}. Use at most {len(groups)} shards.")
    run = CiRun(matrix, baseline_dir, out, update_baseline, [], 0.0, shard=shard, packages=environment()["packages"])

    def write(tmp: Path) -> None:
        from bughunt.worker import WorkerPool

        with WorkerPool() as pool, progress.task("bughunt ci", total=sum(len(g.cells) for g in todo), unit="cell") as bar:
            shown = progress.printer(log)
            for group in todo:  # one worker per implementation and interpreter serves every cell
                bar.update(stage=group.name)
                run.outcomes += _run_group(group, matrix, tmp, shown, pool)
                bar.advance(len(group.cells))
        if update_baseline:
            _record_baselines(run, groups, baseline_protect)
        if baseline_dir.is_dir():
            names = {c.baseline_name for g in groups for c in g.cells}
            run.stale_baselines = sorted(p for p in baseline_dir.glob("*.json") if p.name not in names)
        run.seconds = time.perf_counter() - t0
        write_outputs(run, tmp)
        if finish is not None:
            finish(run, tmp)

    write_output_dir(out, "ci", write, protect)
    _log_end(run, log)
    return run
