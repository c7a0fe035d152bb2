"""The fourth stage: noise floors. The divergence a correct implementation at a dtype shows against float64 is the
reference emulating the family's HF rounding policy at that dtype, against the unrounded reference, per capture point;
never below the dtype's unit roundoff. In compare the float64 reference and its floor passes run side by side in one
read of the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bughunt import metrics
from bughunt.implementations import DTYPES, ImplChoice
from bughunt.jobs import Load, TraceJob, run_in_process
from bughunt.metrics import UNIT_ROUNDOFF, compare_traces
from bughunt.spec import Spec
from bughunt.trace import Trace

METHOD = "reference emulating the family's rounding policy vs float64"


def runs_floors(plan, choice: ImplChoice) -> bool:
    """Whether this choice is the plan's in-process float64 reference, which runs the floor passes beside its own."""
    return choice is plan.reference and choice.in_main_process and plan.dtype_of(choice) == "fp64"


def reference_with_floors(load: Load, tokens: np.ndarray, floor_dtypes, scratch: Path, on_step=None,
                          inner: bool = False) -> tuple[Trace, dict[str, Trace]]:
    """The float64 reference and its noise-floor passes (the reference emulating each dtype) in one read of the model.
    Quantized weight types read their own weights, one pass each."""
    from bughunt.implementations.reference import ReferenceRunner, run_together

    dtypes = [d for d in dict.fromkeys(floor_dtypes) if d != "fp64"]
    quantized = [d for d in dtypes if d not in DTYPES]
    dtypes = [d for d in dtypes if d in DTYPES]
    o = {"branches": load.branches, "allow_pickle": load.allow_pickle}
    runners = [ReferenceRunner(load.checkpoint, load.spec, "fp64", load.device, label=load.choice.label,
                               toggles=load.all_toggles, **o)]
    runners += [ReferenceRunner(load.checkpoint, load.spec, d, "cpu", label=f"reference:{d}", **o) for d in dtypes]
    try:
        for r in runners:
            r.open()
        stems = [scratch / "reference-fp64"] + [scratch / f"floor-{d}" for d in dtypes]
        traces = run_together(runners, tokens, stems, on_step, inner)
    finally:
        for r in runners:
            r.close()
    floors = dict(zip(dtypes, traces[1:]))
    for d in quantized:
        q = Load(ImplChoice("reference", d), load.checkpoint, load.spec, d, "cpu", load.branches, load.allow_pickle)
        floors[d] = run_in_process(q, TraceJob(tokens, scratch / f"floor-{d}"))
    return traces[0], floors


def run_reference_with_floors(ctx, bar) -> Trace:
    """compare's reference: the float64 pass and a floor pass for each candidate's dtype (kept in ctx.floor_traces)."""
    from reference_impls import steps

    plan = ctx.plan
    bar.update(stage="float64 + noise-floor passes", total=steps(plan.spec), done=0)
    trace, floors = reference_with_floors(ctx.load(plan.reference), plan.tokens, [plan.dtype_of(c) for c in plan.candidates],
                                          ctx.scratch, bar.advance, plan.trace_fields.get("inner", False))
    ctx.floor_traces.update(floors)
    return trace


def floor_from(fp64: Trace, emulated: Trace | None, dtype: str, tokens: np.ndarray) -> dict:
    """The floor document from the float64 trace and the one emulating `dtype` (None at fp64: a floor of zero)."""
    u = UNIT_ROUNDOFF.get(dtype, UNIT_ROUNDOFF["fp32"])  # quantized weights: llama.cpp computes in fp32
    if dtype == "fp64":
        measured = {p: {"point": p, "rel_l2": 0.0, "l2": 0.0} for p in fp64.points()}
    else:
        measured = {m["point"]: m for m in compare_traces(emulated, fp64, tokens)}
    points = {}
    for p in fp64.points():
        rel = measured[p]["rel_l2"] or 0.0
        points[p] = {"rel_l2": rel, "l2": measured[p]["l2"] or 0.0, "floor_rel_l2": max(rel, u), "ref_norm": _norm(fp64.arrays[p])}
        per_pos = (measured[p].get("per_position") or {}).get("rel_l2")
        if per_pos is not None:
            points[p]["floor_rel_l2_per_position"] = [max(v or 0.0, u) for v in per_pos]
    if "logits" in points:
        points["logits"].update(metrics.loss_floor(measured.get("logits", {}), fp64.arrays["logits"], tokens, u))
    timings = {}
    if emulated is not None:
        timings["emulated_forward_s"] = emulated.meta["timings"]["forward_s"]
    return {"dtype": dtype, "unit_roundoff": u, "method": METHOD, "timings": timings, "points": points}


def noise_floor(checkpoint: Path, spec: Spec, dtype: str, tokens: np.ndarray, *, fp64: Trace | None = None,
                allow_pickle: bool = False, scratch: Path | None = None, inner: bool = False) -> dict:
    """The noise floor at `dtype` for this input, running what it needs: the float64 reference (unless `fp64` is given)
    and the reference emulating `dtype`. With `scratch`, the traces stream to files there instead of memory."""

    ref = Load(ImplChoice("reference", "fp64"), Path(checkpoint), spec, "fp64", allow_pickle=allow_pickle)
    timings = {}
    if fp64 is None and scratch is not None and dtype != "fp64":  # both passes in one read of the model
        fp64, floors = reference_with_floors(ref, tokens, [dtype], Path(scratch), inner=inner)
        return floor_from(fp64, floors[dtype], dtype, tokens)
    if fp64 is None:
        fp64 = run_in_process(ref, TraceJob(tokens, Path(scratch) / "floor-fp64" if scratch else None, inner))
        timings["fp64_forward_s"] = fp64.meta["timings"]["forward_s"]
    emulated = None
    if dtype != "fp64":
        emu = Load(ImplChoice("reference", dtype), Path(checkpoint), spec, dtype, allow_pickle=allow_pickle)
        emulated = run_in_process(emu, TraceJob(tokens, Path(scratch) / f"floor-{dtype}" if scratch else None, inner))
    floor = floor_from(fp64, emulated, dtype, tokens)
    floor["timings"].update(timings)
    return floor


def floors_for(ctx) -> dict[str, dict]:
    """dtype -> floor for every dtype a candidate that ran computes at (from the passes run beside the reference when
    there were any; else run now)."""
    plan = ctx.plan
    ref_trace = ctx.traces[plan.reference.label]
    fp64 = ref_trace if (plan.reference.name == "reference" and ref_trace.meta.get("dtype") == "fp64") else None
    inner = plan.trace_fields.get("inner", False)
    floors = {}
    for entry in ctx.entries.values():
        if entry.label == plan.reference.label or entry.status != "ok" or entry.dtype in floors:
            continue
        emulated = ctx.floor_traces.get(entry.dtype) if fp64 is not None else None
        if fp64 is not None and (emulated is not None or entry.dtype == "fp64"):
            floors[entry.dtype] = floor_from(fp64, emulated, entry.dtype, plan.tokens)
        else:
            floors[entry.dtype] = noise_floor(plan.checkpoint, plan.spec, entry.dtype, plan.tokens, fp64=fp64,
                                              allow_pickle=plan.options.allow_pickle, scratch=ctx.scratch, inner=inner)
    return floors


def _norm(array: np.ndarray) -> float:
    """L2 norm of a (possibly memory-mapped) array, read a block at a time."""
    from bughunt.safetensors_io import release

    flat = array.reshape(-1) if array.ndim else array.reshape(1)
    step = 4 << 20
    total = sum(float(np.dot(c, c)) for c in (np.asarray(flat[i:i + step], dtype=np.float64) for i in range(0, flat.size, step)))
    release(array)
    return float(np.sqrt(total))
