"""The fourth stage: noise floors. The divergence a correct implementation at a dtype shows against float64 is measured
by the reference emulating the family's HF rounding policy at that dtype, against the unrounded reference, per capture
point and per position; never below the dtype's unit roundoff. The emulated passes sum the products of every matrix
multiply (linear layers, attention scores and their weighted sum of values, logits) in fp32 with numpy's BLAS, as
correct fp32, bf16 and fp16 kernels do: at fp32 that summation is the largest error there is (about u sqrt(K) times the
condition of each dot product, not u), and two correct kernels differ by its order. So at fp32 the floor is the larger
of two passes summing in different legitimate orders (BLAS's own, and the reduction reversed); at bf16 and fp16 the
output roundings dominate and one pass suffices. In compare the float64 reference and its floor passes run side by
side in one read of the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bughunt import metrics
from bughunt.implementations import DTYPES, ImplChoice
from bughunt.jobs import Load, TraceJob, run_in_process
from bughunt.metrics import UNIT_ROUNDOFF, compare_traces
from bughunt.spec import Spec
from bughunt.trace import Trace

METHOD = ("the larger divergence from float64 of the reference emulating the family's rounding policy with its matrix "
          "products summed in fp32 in {orders}, per point and per position; never below the unit roundoff")
# The summation orders of the floor's emulated passes at each dtype (reference_impls._numerics.ACCUMULATE). At fp32 the
# order is the error: two orders, so that one pass's luckily small error at a position is not taken for the floor.
ORDERS = {"fp32": ("fp32", "fp32-reversed"), "bf16": ("fp32",), "fp16": ("fp32",)}
_ORDER_WORDS = {"fp32": "BLAS's order", "fp32-reversed": "the reverse order"}
QUANTIZED_METHOD = ("the divergence from float64 of the reference computing on the dtype's quantized weights, with each "
                    "product's activations quantized as llama.cpp's CPU dot product quantizes them for that weight type "
                    "(Q8_0, Q8_1 or Q8_K), per point and per position; never below the fp32 unit roundoff")


def runs_floors(plan, choice: ImplChoice) -> bool:
    """Whether this choice is the plan's in-process float64 reference, which runs the floor passes beside its own."""
    return choice is plan.reference and choice.in_main_process and plan.dtype_of(choice) == "fp64"


def reference_with_floors(load: Load, tokens: np.ndarray, floor_dtypes, scratch: Path | None, on_step=None,
                          inner: bool = False, fp64: Trace | None = None) -> tuple[Trace, dict[str, list[Trace]]]:
    """The float64 reference (unless `fp64` is given) and its noise-floor passes (the reference emulating each dtype,
    one pass per summation order in ORDERS) in one read of the model: (the float64 trace, dtype -> its floor passes).
    Quantized weight types read their own weights, one pass each. Without `scratch` the traces are held in memory."""
    from reference_impls import Policy

    from bughunt.implementations.reference import ReferenceRunner, run_together

    dtypes = [d for d in dict.fromkeys(floor_dtypes) if d != "fp64"]
    quantized = [d for d in dtypes if d not in DTYPES]
    o = {"branches": load.branches, "allow_pickle": load.allow_pickle}
    passes = [(d, order) for d in dtypes if d in DTYPES for order in ORDERS[d]]
    runners = [] if fp64 is not None else [ReferenceRunner(load.checkpoint, load.spec, "fp64", load.device,
                                                           label=load.choice.label, toggles=load.all_toggles, **o)]
    runners += [ReferenceRunner(load.checkpoint, load.spec, d, "cpu", label=f"reference:{d}", policy=Policy(accumulate=order), **o)
                for d, order in passes]
    stems = ([] if fp64 is not None else ["reference-fp64"]) + [f"floor-{d}-{order}" for d, order in passes]
    traces = []
    try:
        for r in runners:
            r.open()
        if runners:
            traces = run_together(runners, tokens, [scratch / stem if scratch else None for stem in stems], on_step, inner)
    finally:
        for r in runners:
            r.close()
    if fp64 is None:
        fp64, traces = traces[0], traces[1:]
    floors: dict[str, list[Trace]] = {}
    for (d, _), trace in zip(passes, traces):
        floors.setdefault(d, []).append(trace)
    for d in quantized:
        q = Load(ImplChoice("reference", d), load.checkpoint, load.spec, d, "cpu", load.branches, load.allow_pickle)
        floors[d] = [run_in_process(q, TraceJob(tokens, scratch / f"floor-{d}" if scratch else None))]
    return fp64, floors


def run_reference_with_floors(ctx, bar) -> Trace:
    """compare's reference: the float64 pass and a floor pass for each candidate's dtype (kept in ctx.floor_traces)."""
    from reference_impls import steps

    plan = ctx.plan
    bar.update(stage="float64 + noise-floor passes", total=steps(plan.spec), done=0)
    trace, floors = reference_with_floors(ctx.load(plan.reference), plan.tokens, [plan.dtype_of(c) for c in plan.candidates],
                                          ctx.scratch, bar.advance, plan.trace_fields.get("inner", False))
    ctx.floor_traces.update(floors)
    return trace


def floor_from(fp64: Trace, emulated: list[Trace] | None, dtype: str, tokens: np.ndarray) -> dict:
    """The floor document from the float64 trace and the passes emulating `dtype` (None at fp64: a floor of zero): at
    each point and position the largest divergence any of the passes shows, never below the unit roundoff."""
    u = UNIT_ROUNDOFF.get(dtype, UNIT_ROUNDOFF["fp32"])  # quantized weights: llama.cpp computes in fp32
    if dtype == "fp64":
        measured = {p: {"point": p, "rel_l2": 0.0, "l2": 0.0} for p in fp64.points()}
    else:
        measured = _largest([{m["point"]: m for m in compare_traces(e, fp64, tokens)} for e in emulated])
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
    if emulated:
        timings["emulated_forward_s"] = emulated[0].meta["timings"]["forward_s"]  # one pass's own time
        timings["emulated_passes"] = len(emulated)
    floor = {"dtype": dtype, "unit_roundoff": u, "method": method(dtype), "orders": list(ORDERS.get(dtype, ())),
             "timings": timings, "points": points}
    emulation = next((e.meta["quantization"] for e in emulated or () if e.meta.get("quantization")), None)
    if emulation is not None:  # a quantization floor: what it emulated, and what it could not
        floor["emulates"] = emulation
    return floor


def method(dtype: str) -> str:
    """In words, what the floor at `dtype` is."""
    if dtype == "fp64":
        return "float64 itself: the unit roundoff"
    if dtype not in ORDERS:
        return QUANTIZED_METHOD
    return METHOD.format(orders=" and ".join(_ORDER_WORDS[o] for o in ORDERS[dtype]))


def _largest(measured: list[dict[str, dict]]) -> dict[str, dict]:
    """Point -> the largest of several passes' divergences from float64: relative and absolute L2, each position's
    relative L2 and, on logits, the loss difference (mean absolute, and each position's absolute)."""
    if len(measured) == 1:
        return measured[0]

    def most(values):
        return max((v for v in values if v is not None), default=None)

    out = {}
    for p, first in measured[0].items():
        each = [m[p] for m in measured if p in m]
        merged = {**first, "rel_l2": most(m.get("rel_l2") for m in each), "l2": most(m.get("l2") for m in each)}
        per = [(m.get("per_position") or {}).get("rel_l2") for m in each]
        if all(v is not None for v in per):
            merged["per_position"] = {"rel_l2": [most(vs) for vs in zip(*per)]}
        if first.get("abs_delta_nll") is not None:
            merged["abs_delta_nll"] = most(m.get("abs_delta_nll") for m in each)
            merged["delta_nll_per_position"] = [most(abs(v) if v is not None else None for v in vs)
                                                for vs in zip(*(m["delta_nll_per_position"] for m in each))]
        out[p] = merged
    return out


def noise_floor(checkpoint: Path, spec: Spec, dtype: str, tokens: np.ndarray, *, fp64: Trace | None = None,
                allow_pickle: bool = False, scratch: Path | None = None, inner: bool = False) -> dict:
    """The noise floor at `dtype` for this input, running what it needs in one read of the model: the float64
    reference (unless `fp64` is given) and the passes emulating `dtype`. With `scratch`, the traces stream to files
    there instead of memory."""
    ref = Load(ImplChoice("reference", "fp64"), Path(checkpoint), spec, "fp64", allow_pickle=allow_pickle)
    given = fp64 is not None
    fp64, floors = reference_with_floors(ref, tokens, [dtype], Path(scratch) if scratch else None, inner=inner, fp64=fp64)
    floor = floor_from(fp64, floors.get(dtype), dtype, tokens)
    if not given:
        floor["timings"]["fp64_forward_s"] = fp64.meta["timings"]["forward_s"]
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
