"""The `sweep` experiment: one implementation against a reference under many toggle settings.

Modes: one-at-a-time (one line per toggle), cumulative (toggles applied in order, one line per prefix: the
Gemma bug-hunt figure), and search (the settings that make the two agree best: exhaustive up to a few
hundred combinations, greedy forward selection beyond; then a remove-one ablation and the residual against
the noise floor, said in one sentence). Toggles go on the reference side (which numerics does the candidate
actually implement?) or on the candidate side (which fixes make it match?)."""

from __future__ import annotations

import datetime as _dt
import itertools
import tempfile
import math
import shlex
from pathlib import Path
from typing import Sequence

import numpy as np

from bughunt import progress
from bughunt.checkpoint import validate_weights
from bughunt.inputs.flags import positive
from bughunt.inputs.tokens import check_token_range
from bughunt.assemble import save
from bughunt.execute import run_trace
from bughunt.floors import noise_floor
from bughunt.jobs import Load, TraceJob, runner_kwargs
from bughunt.judging import judge, summary as _summary, unrepresentable_finding
from bughunt.plan import DEFAULT_FLOOR_FACTOR, default_tokens
from bughunt.errors import BughuntError
from bughunt.hypotheses import PREFIX, changes_for
from bughunt.implementations import DEVICES, DTYPES, ImplChoice, runner_class
from bughunt.metrics import compare_traces
from bughunt.result import SCHEMA_VERSION, Result, environment
from bughunt.spec import load_spec
from bughunt.text import attach, resolve_input
from bughunt.toggles import available, changed, defaults, describe_setting, is_field, lookup, parse_toggles
from bughunt.trace import Trace, is_residual_point

MODES = ("one-at-a-time", "cumulative", "search")
SIDES = ("reference", "candidate")
MAX_EXHAUSTIVE = 300
MARGIN = 0.05  # decades of mean improvement a change must bring to count (guards against fitting rounding noise)
# Screening (an in-process reference only): settings are first run through the decoder layers up to the one where the
# comparison first departs, and only those whose fit there is within CONFIRM_MARGIN decades of the best are run in
# full, at most CONFIRM_MAX of them. A setting that does not repair the first departing layer cannot explain it.
CONFIRM_MARGIN = 1.0
CONFIRM_MAX = 8


def _label(toggles: dict[str, str]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in toggles.items()) + "}" if toggles else "{}"


def score(points: list[dict]) -> float:
    """Mean over capture points of log10(max(rel_l2, floor) / floor): 0 when every point is at or below its
    noise floor, growing with the divergence. NaN/Inf or a failed point counts as 10 decades."""
    vals = []
    for p in points:
        if p.get("error") or p.get("nonfinite") or p.get("rel_l2") is None:
            vals.append(10.0)
        else:
            vals.append(math.log10(max(p["rel_l2"], p["floor_rel_l2"]) / p["floor_rel_l2"]))
    return float(np.mean(vals)) if vals else 10.0


def fit(points: list[dict]) -> float:
    """What the search minimises: mean log10 of rel_l2 relative to the floor, not saturated at the floor (so an
    emulating reference that reproduces a bug exactly is preferred even inside the floor), bounded below at
    1e-3 x floor so bit-exact agreement does not dominate."""
    vals = []
    for p in points:
        if p.get("error") or p.get("nonfinite") or p.get("rel_l2") is None:
            vals.append(10.0)
        else:
            vals.append(math.log10(max(p["rel_l2"], 1e-3 * p["floor_rel_l2"]) / p["floor_rel_l2"]))
    return float(np.mean(vals)) if vals else 10.0


def _parse_sweep_toggles(items: Sequence[str], spec) -> list[tuple[str, str | None]]:
    """'name=value' or a bare 'name' (search every suggested value)."""
    from bughunt.toggles import _unknown

    out = []
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        toggle = lookup(name, spec)
        if toggle is None:
            raise BughuntError(_unknown(name, spec))
        if not toggle.applies(spec):
            raise BughuntError(f"toggle {name} does not apply to family {spec.family}.")
        out.append((name, toggle.parse(value, spec) if sep else None))
    return out


def sweep(checkpoint: str | Path, impl: str = "hf", reference: str | None = None, dtype: str = "fp32", device: str = "cpu",
          toggles: Sequence[str] = (), mode: str = "one-at-a-time", side: str = "reference",
          candidate_toggles: dict | Sequence[str] | None = None, reference_toggles: dict | Sequence[str] | None = None,
          tokens=None, out: str | Path | None = None, floor_factor: float = DEFAULT_FLOOR_FACTOR,
          max_exhaustive: int = MAX_EXHAUSTIVE, render: bool = True, isolate: bool = True, timeout: float | None = None,
          candidate_trace: Trace | None = None, reference_traces: dict | None = None,
          text=None) -> Result:
    """Run a toggle sweep; see the module docstring. `reference` defaults to the reference emulating `dtype`.
    Implementations other than the reference run in worker processes unless `isolate` is False.
    `candidate_trace`: a trace of the candidate already made (e.g. a library run with a planted bug), used instead of
    running `impl` (reference side only). `reference_traces`: a dict the caller keeps across sweeps of one checkpoint
    and input, holding the in-process reference's traces (in memory) and floor so later sweeps reuse them."""
    from bughunt.output import check_output_dir
    from bughunt.worker import WorkerPool

    if out is not None:
        check_output_dir(out, "sweep", [("the checkpoint", Path(checkpoint))])
    with WorkerPool() as pool, tempfile.TemporaryDirectory(prefix="bughunt-sweep-") as scratch, \
            progress.task(f"sweep {impl}", unit="setting") as bar:
        return _sweep(checkpoint, impl, reference, dtype, device, toggles, mode, side, candidate_toggles, reference_toggles,
                      tokens, out, floor_factor, max_exhaustive, render, pool if isolate else None, timeout, Path(scratch), bar,
                      candidate_trace, reference_traces, text)


def _sweep(checkpoint, impl, reference, dtype, device, toggles, mode, side, candidate_toggles, reference_toggles, tokens, out,
           floor_factor, max_exhaustive, render, pool, timeout, scratch: Path, bar=progress.OFF, candidate_trace=None,
           reference_traces=None, text=None) -> Result:
    checkpoint = Path(checkpoint)
    if mode not in MODES:
        raise BughuntError(f"unknown --mode '{mode}'. Use one of: {', '.join(MODES)}.")
    if side not in SIDES:
        raise BughuntError(f"unknown --side '{side}'. Use one of: {', '.join(SIDES)}.")
    if dtype not in DTYPES or device not in DEVICES:
        raise BughuntError(f"dtype must be one of {DTYPES} and device one of {DEVICES}.")
    spec = load_spec(checkpoint)
    validate_weights(checkpoint, spec)
    tokens, encoded = resolve_input(checkpoint, spec, tokens, text)
    tokens = default_tokens(spec) if tokens is None else tokens
    check_token_range(tokens, spec.vocab_size)
    positive(floor_factor, "--floor-factor", "a finding is a point above this multiple of the noise floor")
    cand_choice = ImplChoice.parse(impl)
    ref_choice = ImplChoice.parse(reference or f"reference:{dtype}")
    from bughunt.envs import prepare

    prepare([cand_choice, ref_choice], in_process=pool is None)  # create missing library-version environments; refuse a missing own one
    cand_dtype = cand_choice.dtype or (dtype if cand_choice.name != "reference" else "fp64")
    ref_dtype = ref_choice.dtype or ("fp64" if ref_choice.name == "reference" else dtype)
    cand_fixed = parse_toggles(candidate_toggles, spec)
    ref_fixed = parse_toggles(reference_toggles, spec)
    varied_choice = ref_choice if side == "reference" else cand_choice
    cannot_apply = runner_class(varied_choice.name).cannot_apply
    items = _parse_sweep_toggles(toggles, spec)
    for name, _ in items:
        if cannot_apply(name) is not None:
            raise BughuntError(f"implementation '{varied_choice.name}' cannot apply toggle {name}: {cannot_apply(name)}. "
                               f"Sweep it on the other side (--side {'candidate' if side == 'reference' else 'reference'}).")
    if mode != "search" and not items:
        raise BughuntError(f"--mode {mode} needs at least one --toggle NAME=VALUE.")
    if mode != "search" and any(v is None for _, v in items):
        raise BughuntError(f"--mode {mode} needs a value for every toggle (NAME=VALUE); bare names are for --mode search.")

    stems = itertools.count()
    next_stem = lambda: scratch / f"trace{next(stems)}"  # noqa: E731

    def run(choice: ImplChoice, run_dtype: str, tg: dict[str, str]) -> Trace:
        from bughunt.worker import WorkerFailure

        try:
            load = Load(choice, checkpoint, spec, run_dtype, device, toggles=tg, runner_kwargs=runner_kwargs(choice))
            return run_trace(load, TraceJob(tokens, next_stem()), pool, timeout)
        except WorkerFailure as e:
            raise BughuntError(f"{choice.label} failed during the sweep: {e}") from None

    base = defaults(spec)
    bar.update(stage=f"running {(ref_choice if side == 'candidate' else cand_choice).label}")
    if candidate_trace is not None and side != "reference":
        raise BughuntError("a candidate trace made beforehand can only be explained with toggles on the reference side.")
    fixed_trace = candidate_trace if candidate_trace is not None else \
        run(ref_choice, ref_dtype, ref_fixed) if side == "candidate" else run(cand_choice, cand_dtype, cand_fixed)
    floor_dir = scratch / "floor"
    floor_dir.mkdir()
    bar.update(stage="noise floor")
    kept = reference_traces if reference_traces is not None else {}
    where = (str(checkpoint.resolve()), tokens.tobytes(), tokens.shape, ref_choice.label, ref_dtype, tuple(sorted(ref_fixed.items())))
    if (where, "floor", cand_dtype) not in kept:
        kept[where, "floor", cand_dtype] = noise_floor(checkpoint, spec, cand_dtype, tokens, scratch=floor_dir)
    floor = kept[where, "floor", cand_dtype]
    cache: dict[tuple, dict] = {}
    bar.update(stage="search setting" if mode == "search" else "setting", total=None if mode == "search" else 1 + len(items), done=0)
    varied_choice, varied_dtype, varied_fixed = (ref_choice, ref_dtype, ref_fixed) if side == "reference" else \
        (cand_choice, cand_dtype, cand_fixed)
    # An in-process reference evaluates a batch of settings in one read of the model (reference_impls.forward_many).
    together = varied_choice.name == "reference" and varied_choice.python is None
    batch = _batch_size(spec, tokens) if together else 1

    keep = reference_traces is not None and together and side == "reference"  # reference traces reused by later sweeps

    def judged(key: tuple, varied: Trace, screening: bool = False) -> dict:
        points = compare_traces(fixed_trace, varied) if side == "reference" else compare_traces(varied, fixed_trace)
        points, first = judge(points, floor, floor_factor)
        if not keep or screening:
            _discard(varied)  # its metrics are kept; the arrays are not needed again
        return {"toggles": dict(key), "label": _label(dict(key)), "score": score(points), "fit": fit(points),
                "first_above_floor": first, "points": points,
                "max_ratio_to_floor": max((p.get("ratio_to_floor") or 0.0) for p in points)}

    prints: dict[tuple, str | None] = {}
    passes = {"full": 0, "screening": 0}  # reference passes (or candidate runs) actually made

    def fingerprint(k: tuple) -> str | None:
        """What an in-process reference pass under setting k computes: its spec, policy and input ids. Settings with
        the same fingerprint give bit-identical traces (another spelling of one setting), so one pass serves them all."""
        if k not in prints:
            prints[k] = None
            if together:
                from bughunt.implementations.reference import ReferenceRunner
                from bughunt.toggles import apply_to_tokens

                try:
                    r = ReferenceRunner(checkpoint, spec, varied_dtype, device, toggles={**varied_fixed, **dict(k)})
                    ids = apply_to_tokens(np.atleast_2d(tokens), r.spec, r.toggles)
                    prints[k] = repr((r.spec.replace(notes=()), r.policy, ids.shape, ids.tobytes()))
                except BughuntError:
                    pass
        return prints[k]

    def unique(todo: list[tuple], done) -> tuple[list[tuple], dict[tuple, tuple]]:
        """The settings to run, and for each other one the setting whose pass it shares (one of `todo`, or one of
        `done`, the settings already run)."""
        first: dict[str, tuple] = {f: k for k in done if (f := fingerprint(k)) is not None}
        same: dict[tuple, tuple] = {}
        for k in todo:
            f = fingerprint(k)
            if f is not None and f in first:
                same[k] = first[f]
            elif f is not None:
                first[f] = k
        return [k for k in todo if k not in same], same

    def alias(entry: dict, k: tuple) -> dict:
        return {**entry, "toggles": dict(k), "label": _label(dict(k))}

    def evaluate_many(settings: list[dict[str, str]]) -> list[dict]:
        keys = [tuple(sorted(changed(spec, tg).items())) for tg in settings]
        todo = [k for k in dict.fromkeys(keys) if k not in cache]
        for k in todo:  # field hypotheses that together leave a config no implementation could read: not a setting
            fields = {n[len(PREFIX):]: v for n, v in k if is_field(n)}
            if fields and changes_for(spec, fields) is None:
                cache[k] = {"toggles": dict(k), "label": _label(dict(k)), "score": 10.0, "fit": 10.0, "first_above_floor": None,
                            "points": [], "max_ratio_to_floor": 0.0}
        todo = [k for k in todo if k not in cache]
        for k in [k for k in todo if keep and (where, k) in kept]:
            cache[k] = judged(k, kept[where, k])
        todo = [k for k in todo if k not in cache]
        todo, same = unique(todo, list(cache))
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            if together:
                traces = _run_reference_batch(varied_choice, checkpoint, spec, varied_dtype, device, tokens,
                                              [{**varied_fixed, **dict(k)} for k in chunk],
                                              [None if keep else next_stem() for _ in chunk])
                if keep:
                    kept.update({(where, k): t for k, t in zip(chunk, traces)})
            else:
                traces = [run(varied_choice, varied_dtype, {**varied_fixed, **dict(k)}) for k in chunk]
            passes["full"] += len(chunk)
            for k, varied in zip(chunk, traces):
                cache[k] = judged(k, varied)
                bar.advance()
        for k, twin in same.items():
            cache[k] = alias(cache[twin], k)
            if keep and (where, twin) in kept:
                kept[where, k] = kept[where, twin]
        return [cache[k] for k in keys]

    screened: dict[tuple, dict] = {}

    def screen_many(settings: list[dict[str, str]], layers: int) -> list[dict]:
        """Each setting judged on the embedding and the first `layers` decoder layers only (entries of settings already
        run in full are cut to the same points), side by side in one read of those layers."""
        keys = [tuple(sorted(changed(spec, tg).items())) for tg in settings]
        todo = [k for k in dict.fromkeys(keys) if k not in cache and (k, layers) not in screened]
        for k in todo:
            fields = {n[len(PREFIX):]: v for n, v in k if is_field(n)}
            if fields and changes_for(spec, fields) is None:
                evaluate_many([dict(k)])  # no implementation could read that config: scored as such, nothing run
        todo = [k for k in todo if k not in cache]
        todo, same = unique(todo, [k for k, depth in screened if depth == layers])
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            traces = _run_reference_batch(varied_choice, checkpoint, spec, varied_dtype, device, tokens,
                                          [{**varied_fixed, **dict(k)} for k in chunk], [next_stem() for _ in chunk], layers=layers)
            passes["screening"] += len(chunk)
            for k, varied in zip(chunk, traces):
                screened[k, layers] = judged(k, varied, screening=True)
        for k, twin in same.items():
            screened[k, layers] = alias(screened[twin, layers], k)
        out = []
        for k in keys:
            if k in cache:  # run in full already: the same points as a screening pass has
                points = [p for p in cache[k]["points"] if _within(p["point"], layers)]
                out.append({**cache[k], "points": points, "fit": fit(points)})
            else:
                out.append(screened[k, layers])
        return out

    def evaluate(tg: dict[str, str]) -> dict:
        return evaluate_many([tg])[0]

    baseline = evaluate({})
    configs: list[dict] = [baseline]
    search_info = None
    if mode == "one-at-a-time":
        configs += evaluate_many([{n: v} for n, v in items])
    elif mode == "cumulative":
        configs += evaluate_many([dict(items[:k + 1]) for k in range(len(items))])
    else:
        who = cand_choice.label + (_label(cand_fixed) if cand_fixed else "")
        can_screen = together and side == "reference"
        search_info = _search(spec, items, cannot_apply, evaluate_many, base, max_exhaustive, who, side, bar,
                              screen_many if can_screen else None)
        search_info["evaluated"] = len(cache)
        search_info["screened"] = len({k for k, _ in screened})
        search_info["passes"] = dict(passes)
        configs = [baseline] + [c for c in search_info.pop("plotted") if c is not baseline]

    cand_label = cand_choice.label + (_label(cand_fixed) if cand_fixed else "")
    ref_label = ref_choice.label + (_label(ref_fixed) if ref_fixed else "")
    comparisons = []
    for c in configs:
        name = (f"{ref_label} + {c['label']}" if side == "reference" else f"{cand_label} + {c['label']}") if c["toggles"] else \
            ("as is" if not (cand_fixed or ref_fixed) else "fixed toggles only")
        comparisons.append({"candidate": name, "reference": ref_label, "dtype": cand_dtype, "points": c["points"],
                            "first_above_floor": c["first_above_floor"], "summary": _summary(c["points"])})
    findings = []
    if baseline["first_above_floor"]:
        p = next(p for p in baseline["points"] if p["point"] == baseline["first_above_floor"])
        ratio = f"{p['ratio_to_floor']:.1f}x the {cand_dtype} noise floor" if p.get("ratio_to_floor") is not None else "NaN/Inf"
        findings.append({"severity": "warning", "kind": "divergence", "implementation": cand_label, "point": baseline["first_above_floor"],
                         "message": f"{cand_label} departs from {ref_label} as is at {baseline['first_above_floor']} ({ratio})"})
    if side == "reference" and fixed_trace.meta.get("cannot_represent"):
        findings.append(unrepresentable_finding(cand_label, fixed_trace.meta["cannot_represent"], baseline["first_above_floor"],
                                                baseline["points"], cand_dtype))
    if search_info:
        findings.append({"severity": "info" if search_info["at_floor"] else "warning", "kind": "diagnosis",
                         "implementation": cand_label, "point": search_info["residual"]["first_above_floor"],
                         "message": search_info["diagnosis"]})
    all_configs = list(cache.values())
    data = {
        "schema": "bughunt.result", "schema_version": SCHEMA_VERSION, "kind": "sweep",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": _command(checkpoint, cand_choice, ref_choice, dtype, device, toggles, mode, side, cand_fixed, ref_fixed, tokens),
        "checkpoint": {"path": str(checkpoint), "spec": spec.to_dict()},
        "inputs": {"tokens": tokens.tolist()},
        "settings": {"dtype": dtype, "device": device, "reference": ref_label, "floor_factor": floor_factor, "branches": True},
        "environment": environment(),
        "implementations": [
            {"label": cand_label, "name": cand_choice.name, "dtype": cand_dtype, "device": device, "status": "ok", "error": None,
             "meta": fixed_trace.meta if side == "reference" else {}, "python": cand_choice.python,
             "isolation": _isolation(cand_choice, pool)},
            {"label": ref_label, "name": ref_choice.name, "dtype": ref_dtype, "device": device, "status": "ok", "error": None,
             "meta": fixed_trace.meta if side == "candidate" else {}, "python": ref_choice.python,
             "isolation": _isolation(ref_choice, pool)}],
        "noise_floor": {cand_dtype: floor},
        "comparisons": comparisons,
        "findings": findings,
        "sweep": {
            "mode": mode, "side": side, "candidate": cand_label, "reference": ref_label,
            "toggle_defaults": base,
            "configurations": [{"label": c["label"], "toggles": c["toggles"], "score": c["score"], "fit": c["fit"],
                                "first_above_floor": c["first_above_floor"], "max_ratio_to_floor": c["max_ratio_to_floor"],
                                "curve": {p["point"]: p.get("log10_l2") for p in c["points"] if is_residual_point(p["point"])},
                                "rel_l2": {p["point"]: p.get("rel_l2") for p in c["points"]}} for c in all_configs],
            "search": search_info,
        },
    }
    if search_info:
        data["diagnosis"] = search_info["diagnosis"]
    attach(data, encoded)
    result = Result(data)
    if out is not None:
        save(result, Path(out), {}, render=render)
    return result


def search_counts(search: dict) -> str:
    """What a search ran, in words, for the terminal and the report: the settings judged in full, and those screened."""
    text = f"{search['method']}, {search['evaluated']} of {search['space_size']} settings evaluated"
    rounds = search.get("screening") or []
    if rounds:
        depth = sorted({r["layers"] for r in rounds})
        where = "the first decoder layer" if depth == [1] else f"the first {' or '.join(map(str, depth))} decoder layers"
        text += (f" in full; {search.get('screened', 0)} screened on {where} in {len(rounds)} "
                 f"round{'s' if len(rounds) > 1 else ''}")
    passes = search.get("passes")
    if passes:
        text += f" ({passes['full']} full and {passes['screening']} screening passes run)"
    return text


def _isolation(choice: ImplChoice, pool) -> str:
    return "in-process" if pool is None or (choice.name == "reference" and choice.python is None) else "worker"


def _batch_size(spec, tokens: np.ndarray) -> int:
    """How many reference passes may step side by side: their float64 activations (the shared layer's weights are
    counted once) within a quarter of available memory, at most 16."""
    from bughunt.memory import available_memory

    b, s = tokens.shape
    per_pass = b * s * (6 * spec.hidden_size + 4 * spec.intermediate_size) * 8 + b * s * spec.vocab_size * 8 // 4 + (32 << 20)
    return int(max(1, min(16, available_memory() // 4 // per_pass)))


def _run_reference_batch(choice: ImplChoice, checkpoint, spec, dtype: str, device: str, tokens: np.ndarray,
                         settings: list[dict[str, str]], stems: list[Path], layers: int | None = None) -> list[Trace]:
    """Reference passes under several toggle settings, side by side in one read of the model (with `layers`, of its
    first decoder layers only)."""
    from bughunt.implementations.reference import ReferenceRunner, run_together

    runners = [ReferenceRunner(checkpoint, spec, dtype, device, label=choice.label, toggles=tg) for tg in settings]
    try:
        for r in runners:
            r.open()
        return run_together(runners, tokens, stems, layers=layers)
    except BughuntError as e:
        raise BughuntError(f"{choice.label} failed during the sweep: {e}") from None
    finally:
        for r in runners:
            r.close()


def _discard(trace: Trace) -> None:
    """Delete a scratch trace's files (a long input's trace is gigabytes)."""
    if trace.stem is not None:
        trace.arrays = {}
        for suffix in (".safetensors", ".json"):
            trace.stem.with_name(trace.stem.name + suffix).unlink(missing_ok=True)


def _rank(c: dict) -> tuple:
    """Among settings that fit exactly as well, prefer the one that names a cause: ignored-field hypotheses first, the
    most specific field first (rope_parameters.partial_rotary_factor rather than all of rope_parameters)."""
    return (sum(not is_field(n) for n in c["toggles"]), -sum(n.count(".") for n in c["toggles"] if is_field(n)))


def _same(a: dict, b: dict) -> bool:
    """Whether two evaluated settings gave the same trace, as far as the comparison sees (rel L2 at every point)."""
    ra = [p.get("rel_l2") for p in a["points"]]
    rb = [p.get("rel_l2") for p in b["points"]]
    if len(ra) != len(rb) or any((x is None) != (y is None) for x, y in zip(ra, rb)):
        return False
    return all(x is None or abs(x - y) <= 1e-9 * max(abs(x), abs(y), 1e-300) for x, y in zip(ra, rb))


def _layer_of(point: str | None) -> int | None:
    """The decoder layer a capture point belongs to (the embedding counts as layer 0's), None after the last layer."""
    if point == "embed":
        return 0
    if point is not None and point.startswith("layer."):
        return int(point.split(".")[1])
    return None


def _within(point: str, layers: int) -> bool:
    """Whether a screening pass through `layers` decoder layers has this point."""
    layer = _layer_of(point)
    return layer is not None and layer < layers


def _screen_depth(spec, entry: dict) -> int | None:
    """How many decoder layers a screening pass runs to judge settings against `entry`: through the layer of its first
    point above the floor. At the floor the search only refines within the noise. Once settings have brought it there
    (entry has toggles), it screens on the first layer, so a refinement that acts only later (the logits' dtype) is
    not tried on top of an explained departure. A comparison at the floor as it is gets the thorough search: through
    the layer of its point furthest from the reference relative to its floor. None where that point is past half the
    model, or after the last layer (judged in full): a screening pass would save little."""
    point = entry["first_above_floor"] or ("embed" if entry["toggles"] else None)
    if point is None:
        ranked = [p for p in entry["points"] if p.get("ratio_to_floor") is not None]
        point = max(ranked, key=lambda p: p["ratio_to_floor"])["point"] if ranked else None
    layer = _layer_of(point)
    return None if layer is None or 2 * (layer + 1) > spec.num_layers else layer + 1


def _first_effect(own: dict, baseline: dict) -> str | None:
    """The first capture point where a setting's comparison differs from the baseline's (where the setting acts)."""
    for a, b in zip(own["points"], baseline["points"]):
        if not _same({"points": [a]}, {"points": [b]}):
            return a["point"]
    return None


def _shortlist(spec, settings: list[dict], against: dict, screen, evaluate_many, record: list) -> list[dict]:
    """The settings judged in full: all of them, or with screening (see CONFIRM_MARGIN) those whose fit through the
    layer where `against` departs beats against's own there by MARGIN and is within CONFIRM_MARGIN of the best there,
    fewest toggles first, at most CONFIRM_MAX."""
    layers = _screen_depth(spec, against) if screen is not None and len(settings) > CONFIRM_MAX else None
    if layers is None:
        return evaluate_many(settings)
    prefix = screen(settings, layers)
    top = min(c["fit"] for c in prefix)
    own = screen([against["toggles"]], layers)[0]["fit"]  # run already: cut to the same points, nothing runs
    order = sorted((i for i, c in enumerate(prefix) if c["fit"] <= top + CONFIRM_MARGIN and c["fit"] < own - MARGIN),
                   key=lambda i: (math.floor(prefix[i]["fit"] / MARGIN), len(prefix[i]["toggles"]), prefix[i]["fit"], _rank(prefix[i])))
    chosen = [settings[i] for i in order[:CONFIRM_MAX]]
    record.append({"layers": layers, "screened": len(settings), "confirmed": len(chosen)})
    return evaluate_many(chosen)


def _spellings(best: dict, space: dict[str, list[str]], base: dict[str, str], evaluate_many, spec=None, screen=None,
               baseline: dict | None = None) -> tuple[list[dict], list[dict]]:
    """The settings that fit exactly as well as `best`: per chosen toggle, the single toggles with the same effect
    alone (one explanation, several spellings), and the whole settings made of them that give the same trace. With
    screening, only the single toggles that give the same comparison through the layer where the chosen one first acts
    are run in full."""
    singles = [{n: v} for n, vals in space.items() for v in vals if v != base.get(n)]
    parts = []
    for name, value in best["toggles"].items():
        own = evaluate_many([{name: value}])[0]
        others = [c for c in singles if c != {name: value}]
        layer = _layer_of(_first_effect(own, baseline)) if screen is not None and baseline is not None else None
        if layer is not None and 2 * (layer + 1) <= spec.num_layers and len(others) > CONFIRM_MAX:
            own_prefix = screen([{name: value}], layer + 1)[0]
            others = [c for c, e in zip(others, screen(others, layer + 1)) if _same(e, own_prefix)]
        alts = [dict(c["toggles"]) for c in evaluate_many(others) if _same(c, own)]
        parts.append({"toggle": name, "value": value, "spellings": [{name: value}] + alts})
    combos = [dict(kv for d in combo for kv in d.items()) for combo in itertools.product(*(p["spellings"] for p in parts))]
    combos = [c for c in combos if len(c) == len(best["toggles"])][:64]
    equal = [c for c in evaluate_many(combos) if _same(c, best)] if len(combos) > 1 else [best]
    return parts, [dict(c["toggles"]) for c in equal]


def _search(spec, items, cannot_apply, evaluate_many, base: dict[str, str], max_exhaustive: int, who: str, side: str,
            bar=progress.OFF, screen=None) -> dict:
    """Find the toggle settings with the lowest score; ties go to fewer changed toggles (Occam), then to settings that
    name a cause (an ignored config field). `evaluate_many` judges a list of settings at once (so an in-process
    reference can run them side by side); `screen(settings, layers)`, when given, judges them on their first layers
    only, and only the settings it shortlists are judged in full (_shortlist)."""
    screening: list[dict] = []
    start = evaluate_many([{}])[0]
    names = list(dict.fromkeys(n for n, _ in items)) or [n for n in available(spec) if cannot_apply(n) is None]
    space: dict[str, list[str]] = {}
    for n in names:
        given = [v for m, v in items if m == n and v is not None]
        bare = any(m == n and v is None for m, v in items) or not items
        vals = [base.get(n, "")] + given + (list(lookup(n, spec).suggestions(spec)) if bare else [])
        space[n] = [v for v in dict.fromkeys(vals) if v != ""]
    size = math.prod(len(v) for v in space.values())
    if size <= max_exhaustive:
        method = "exhaustive"
        bar.update(total=size if screen is None else None)  # every combination is one setting, the one already run among them
        evaluated = _shortlist(spec, [dict(zip(space, combo)) for combo in itertools.product(*space.values())], start, screen,
                               evaluate_many, screening)
        evaluated = evaluated + [start] * all(c["toggles"] for c in evaluated)  # as it is: always a candidate
        top = min(c["fit"] for c in evaluated)
        # Occam: among settings within MARGIN of the best fit, the fewest changed toggles, then the best fit.
        best = min((c for c in evaluated if c["fit"] <= top + MARGIN), key=lambda c: (len(c["toggles"]), c["fit"], _rank(c)))
    else:
        method = "greedy forward selection"
        current: dict[str, str] = {}
        best = evaluate_many([current])[0]
        while True:
            trials = _shortlist(spec, [{**current, n: v} for n, vals in space.items() for v in vals if current.get(n, base.get(n)) != v],
                                best, screen, evaluate_many, screening)
            cand = min(trials, key=lambda c: (c["fit"], _rank(c)), default=None)
            if cand is None or cand["fit"] > best["fit"] - MARGIN:
                break
            best, current = cand, dict(cand["toggles"])
    parts, equivalent = _spellings(best, space, base, evaluate_many, spec, screen, start) if best["toggles"] else ([], [])
    ablation = []
    withouts = evaluate_many([{k: v for k, v in best["toggles"].items() if k != n} for n in best["toggles"]])
    for n, w in zip(best["toggles"], withouts):
        ablation.append({"toggle": n, "value": best["toggles"][n], "score_without": w["score"], "delta": w["fit"] - best["fit"],
                         "first_above_floor_without": w["first_above_floor"], "entry": w})
    ablation.sort(key=lambda a: -a["delta"])
    at_floor = best["first_above_floor"] is None
    baseline = evaluate_many([{}])[0]
    settings = _label(best["toggles"])
    if not best["toggles"] and at_floor:
        sentence = f"implementation {who} agrees with the reference as it is: nothing above the noise floor, and no toggle setting does better"
    elif not best["toggles"]:
        sentence = (f"implementation {who}: no tried toggle setting explains the divergence; it first rises above the floor at "
                    f"{baseline['first_above_floor']} (up to {baseline['max_ratio_to_floor']:.1f}x the floor)")
    else:
        sentence = (f"implementation {who} behaves like the reference with {settings}" if side == "reference" else
                    f"implementation {who} matches the reference once {settings} is applied to it")
        sentence += ("; with these settings every capture point is within the noise floor" if at_floor else
                     f", but a residual remains: first above the floor at {best['first_above_floor']} "
                     f"(up to {best['max_ratio_to_floor']:.1f}x the floor)")
        sentence += "".join(_explain(spec, p) for p in parts)
    for p in parts:
        p["description"] = describe_setting(spec, {p["toggle"]: p["value"]})[0]
    return {
        "method": method, "space": space, "space_size": size, "evaluated": None, "screening": screening,
        "best": best["toggles"], "best_score": best["score"], "best_fit": best["fit"], "baseline_score": baseline["score"],
        "baseline_fit": baseline["fit"], "explanations": parts, "equivalent": equivalent,
        "ablation": [{k: v for k, v in a.items() if k != "entry"} for a in ablation],
        "residual": {"first_above_floor": best["first_above_floor"], "max_ratio_to_floor": best["max_ratio_to_floor"]},
        "at_floor": at_floor, "diagnosis": sentence,
        "plotted": [baseline, best] + [a["entry"] for a in ablation],
    }


def _explain(spec, part: dict) -> str:
    """'. {field:x=ignored}: as if it ignored x (...), also spelled {y=1}' for one chosen toggle."""
    chosen = {part["toggle"]: part["value"]}
    others = [_label(s) for s in part["spellings"][1:]]
    what = describe_setting(spec, chosen)[0] if is_field(part["toggle"]) else None
    if what is None and not others:
        return ""
    text = f". {_label(chosen)}" + (f": {what}" if what else "")
    return text + (f"; the same explanation, spelled otherwise: {', '.join(others)}" if others else "")


def _command(checkpoint, cand, ref, dtype, device, toggles, mode, side, cand_fixed, ref_fixed, tokens) -> str:
    parts = ["bughunt", "sweep", str(checkpoint), "--impl", cand.label, "--reference", ref.label, "--dtype", dtype,
             "--device", device, "--mode", mode, "--side", side]
    for t in toggles:
        parts += ["--toggle", t]
    for k, v in cand_fixed.items():
        parts += ["--candidate-toggle", f"{k}={v}"]
    for k, v in ref_fixed.items():
        parts += ["--reference-toggle", f"{k}={v}"]
    parts += ["--tokens", ";".join(",".join(str(int(t)) for t in row) for row in tokens)]
    return shlex.join(parts)
