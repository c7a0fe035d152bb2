"""The `compare` experiment: one checkpoint through several implementations, each compared against a chosen reference
at every capture point and judged against the dtype's noise floor. A walk through the stages: plan (bughunt/plan.py),
run context (context.py), execute (execute.py), floors (floors.py), judge (judging.py), the probes' parts, assemble and
save (assemble.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from bughunt.assemble import document, refuse_empty, save, weights_note
from bughunt.context import RunContext
from bughunt.errors import BughuntError
from bughunt.execute import execute
from bughunt.findings import Finding
from bughunt.floors import floors_for
from bughunt.implementations import ImplChoice
from bughunt.judging import compare_candidates
from bughunt.plan import Plan, make_plan
from bughunt.result import Result


def compare(checkpoint: str | Path, implementations: Sequence[str | ImplChoice] = ("hf", "reference"), pool=None,
            **settings) -> Result:
    """Compare implementations of one checkpoint layer by layer. Returns the Result; writes files when `out` is set.

    `settings` are the run's options (bughunt.plan.CompareOptions: reference, dtype, device, tokens or text, out,
    floor_factor, branches, allow_pickle, render, isolate, timeout, max_memory, device_map, require_comparison) and its
    probes' options (bughunt/probes: weight_check, inner, isolate_layers, generate, top_k, decode_config, ...); an
    unknown one is refused. `pool` (a bughunt.worker.WorkerPool) may be shared across calls so libraries load once. Every check happens before anything runs (a BughuntError, exit 2 in the CLI)."""
    plan = make_plan(checkpoint, implementations, settings)
    with RunContext(plan, pool) as ctx:
        execute(ctx)
        ctx.close_workers()
        result = judge_and_assemble(ctx)
        if plan.options.out is not None:
            save(result, Path(plan.options.out), ctx.traces, render=plan.options.render)
        return result


def judge_and_assemble(ctx: RunContext) -> Result:
    """Floors, comparisons, findings and the probes' parts of the Result."""
    plan: Plan = ctx.plan
    ref = ctx.entries[plan.reference.label]
    if ref.status != "ok":
        raise BughuntError(f"the reference implementation {ref.label} failed: {ref.error}")
    floors = floors_for(ctx)
    comparisons, findings = compare_candidates(ctx, floors)
    findings += [Finding("info", "config", note) for note in plan.spec.notes]
    data = document(ctx, floors, comparisons, findings)
    probe_findings = []
    for probe, _ in plan.probes:
        probe_findings += probe.attach(data, ctx)
    data["findings"] += [f.to_dict() for f in probe_findings]
    result = Result(data)
    refuse_empty(ctx, result)
    data["findings"] += [f.to_dict() for f in weights_note(plan)]
    return result
