"""The `sweep` experiment: one implementation against a reference under many toggle settings.

Modes: one-at-a-time (one line per toggle), cumulative (toggles applied in order, one line per prefix: the
Gemma bug-hunt figure), and search (the settings that make the two agree best: exhaustive up to a few
hundred combinations, greedy forward selection beyond; then a remove-one ablation and the residual against
the noise floor, said in one sentence). Toggles go on the reference side (which numerics does the candidate
actually implement?) or on the candidate side (which fixes make it match?)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import tempfile
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from bughunt import progress, sources
from bughunt.inputs.flags import choice_of, positive
from bughunt.assemble import save
from bughunt.execute import run_trace
from bughunt.floors import noise_floor
from bughunt.jobs import Load, TraceJob, runner_kwargs
from bughunt.judging import judge, summary as _summary, unrepresentable_finding
from bughunt.plan import DEFAULT_FLOOR_FACTOR, Device, Dtype, native_dtypes, read_inputs, validated
from bughunt.errors import BughuntError
from bughunt.findings import Finding
from bughunt.hypotheses import PREFIX, changes_for
from bughunt.implementations import ImplChoice, runner_class
from bughunt.metrics import compare_traces
from bughunt.numbers import multiple
from bughunt.result import SCHEMA_VERSION, Result, environment
from bughunt.search import (CONFIRM_MARGIN, CONFIRM_MAX, MARGIN, MAX_EXHAUSTIVE, Judges, Question, _within, fit,  # noqa: F401
                            label as _label, score, search, search_counts)
from bughunt.spec import Spec
from bughunt.text import attach
from bughunt.toggles import changed, defaults, is_field, lookup, parse_toggles
from bughunt.trace import Trace, is_residual_point

MODES = ("one-at-a-time", "cumulative", "search")
SIDES = ("reference", "candidate")
Mode, Side = choice_of(MODES, "--mode"), choice_of(SIDES, "--side")


class SweepOptions(BaseModel):
    """How a sweep runs: sweep()'s keywords, checked once; the CLI's flags map onto them. `reference` defaults to the
    reference emulating `dtype`. `candidate_trace`: a trace of the candidate already made, used instead of running the
    candidate (reference side only). `reference_traces`: a dict the caller keeps across sweeps of one checkpoint and
    input, holding the in-process reference's traces and floor so later sweeps reuse them."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    mode: Mode = "one-at-a-time"
    side: Side = "reference"
    reference: str | None = None
    dtype: Dtype = "fp32"
    device: Device = "cpu"
    toggles: Any = ()  # 'NAME=VALUE' or a bare 'NAME' (search: every suggested value)
    candidate_toggles: Any = None  # a dict or 'NAME=VALUE' strings, fixed on the candidate
    reference_toggles: Any = None  # the same, fixed on the reference
    tokens: Any = None
    text: Any = None
    out: Path | None = None
    floor_factor: float = DEFAULT_FLOOR_FACTOR
    max_exhaustive: int = MAX_EXHAUSTIVE
    render: bool = True
    isolate: bool = True  # implementations other than the reference in worker processes
    timeout: float | None = None
    candidate_trace: Any = None
    reference_traces: Any = None  # kept by identity: the caller's dict is filled in


def sweep(checkpoint: str | Path, impl: str = "hf", pool=None, **settings) -> Result:
    """Run a toggle sweep of `impl` against the reference; see the module docstring and SweepOptions for `settings`
    (an unknown one is refused). Implementations other than the reference run in worker processes of `pool` (one is
    opened for this sweep when None) unless `isolate` is False."""
    from bughunt.output import check_output_dir
    from bughunt.worker import WorkerPool

    options = validated(SweepOptions, settings)
    if options.out is not None:
        check_output_dir(options.out, "sweep", [("the checkpoint", Path(checkpoint))])
    with contextlib.ExitStack() as stack:
        pool = pool if pool is not None else stack.enter_context(WorkerPool())
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bughunt-sweep-")))
        bar = stack.enter_context(progress.task(f"sweep {impl}", unit="setting"))
        plan = SweepPlan.read(sources.resolve(checkpoint), impl, options, in_process=not options.isolate)
        state = Sweep(plan, pool if options.isolate else None, scratch, bar)
        configs, search_info = state.configurations()
        return _result(state, configs, search_info)


@dataclass(frozen=True)
class SweepPlan:
    """Everything a sweep needs, read and checked before anything runs."""

    checkpoint: Path
    spec: Spec
    options: SweepOptions
    tokens: np.ndarray
    encoded: Any
    candidate: ImplChoice
    reference: ImplChoice
    cand_dtype: str
    ref_dtype: str
    cand_fixed: dict[str, str]
    ref_fixed: dict[str, str]
    items: list[tuple[str, str | None]]  # the toggles swept: (name, value, or None for every suggested value)

    @classmethod
    def read(cls, checkpoint: Path, impl: str, options: SweepOptions, in_process: bool) -> "SweepPlan":
        from bughunt.envs import prepare, refuse

        inputs = read_inputs(checkpoint, options.tokens, options.text)  # the planning stage compare and decode share
        spec, tokens, encoded = inputs.spec, inputs.tokens, inputs.encoded
        positive(options.floor_factor, "--floor-factor", "a finding is a point above this multiple of the noise floor")
        cand = ImplChoice.parse(impl)
        ref = ImplChoice.parse(options.reference or f"reference:{options.dtype}")
        both, ref = native_dtypes([cand, ref], ref, checkpoint)  # llamacpp on a GGUF file: the file's own type
        cand = both[0]
        refuse([cand, ref], in_process=in_process)  # cheap refusals now; environments are built once the plan is accepted
        plan = cls(checkpoint, spec, options, tokens, encoded, cand, ref,
                   cand_dtype=cand.dtype_at(options.dtype), ref_dtype=ref.dtype_at(options.dtype),
                   cand_fixed=parse_toggles(options.candidate_toggles, spec),
                   ref_fixed=parse_toggles(options.reference_toggles, spec),
                   items=_parse_sweep_toggles(options.toggles, spec))
        plan.check_items()
        prepare([cand, ref], in_process=in_process)  # create missing library-version environments (minutes of pip)
        return plan

    def check_items(self) -> None:
        """Refuse toggles the varied side cannot apply, and a mode that needs values it was not given."""
        mode, side, name_ = self.options.mode, self.options.side, self.varied[0].name
        cannot_apply = self.cannot_apply
        for name, _ in self.items:
            if cannot_apply(name) is not None:
                raise BughuntError(f"implementation '{name_}' cannot apply toggle {name}: {cannot_apply(name)}. "
                                   f"Sweep it on the other side (--side {'candidate' if side == 'reference' else 'reference'}).")
        if mode != "search" and not self.items:
            raise BughuntError(f"--mode {mode} needs at least one --toggle NAME=VALUE.")
        if mode != "search" and any(v is None for _, v in self.items):
            raise BughuntError(f"--mode {mode} needs a value for every toggle (NAME=VALUE); bare names are for --mode search.")

    @property
    def varied(self) -> tuple[ImplChoice, str, dict[str, str]]:
        """The side the toggles go on: its implementation, dtype and fixed toggles."""
        if self.options.side == "reference":
            return self.reference, self.ref_dtype, self.ref_fixed
        return self.candidate, self.cand_dtype, self.cand_fixed

    @property
    def cannot_apply(self):
        return runner_class(self.varied[0].name).cannot_apply

    @property
    def together(self) -> bool:
        """Whether the varied side is the in-process reference, which evaluates a batch of settings in one read of
        the model (reference_impls.forward_many)."""
        return self.varied[0].in_main_process

    def label(self, which: str) -> str:
        """'candidate' or 'reference' with its fixed toggles."""
        choice, fixed = (self.candidate, self.cand_fixed) if which == "candidate" else (self.reference, self.ref_fixed)
        return choice.label + (_label(fixed) if fixed else "")


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


class Sweep:
    """One sweep's running state: the fixed side's trace and the noise floor, and every setting judged so far (in
    full, or screened on the first layers), with the passes run to judge them."""

    def __init__(self, plan: SweepPlan, pool, scratch: Path, bar=progress.OFF):
        self.plan, self.pool, self.scratch, self.bar = plan, pool, scratch, bar
        self.stems = itertools.count()
        self.cache: dict[tuple, dict] = {}  # setting -> judged in full
        self.screened: dict[tuple, dict] = {}  # (setting, layers) -> judged on the first layers
        self.prints: dict[tuple, str | None] = {}
        self.passes = {"full": 0, "screening": 0}  # reference passes (or candidate runs) actually made
        options = plan.options
        self.kept = options.reference_traces if options.reference_traces is not None else {}
        self.keep = options.reference_traces is not None and plan.together and options.side == "reference"
        self.where = (str(plan.checkpoint.resolve()), plan.tokens.tobytes(), plan.tokens.shape, plan.reference.label,
                      plan.ref_dtype, tuple(sorted(plan.ref_fixed.items())))
        self.fixed_trace, self.floor = self._start()
        self.bar.update(stage="search setting" if options.mode == "search" else "setting",
                        total=None if options.mode == "search" else 1 + len(plan.items), done=0)
        self.batch = _batch_size(plan.spec, plan.tokens) if plan.together else 1

    def _start(self) -> tuple[Trace, dict]:
        """The fixed side's trace (run, or the candidate trace given) and the candidate dtype's noise floor."""
        plan, options = self.plan, self.plan.options
        side = options.side
        self.bar.update(stage=f"running {(plan.reference if side == 'candidate' else plan.candidate).label}")
        if options.candidate_trace is not None and side != "reference":
            raise BughuntError("a candidate trace made beforehand can only be explained with toggles on the reference side.")
        fixed_trace = options.candidate_trace if options.candidate_trace is not None else \
            self.run(plan.reference, plan.ref_dtype, plan.ref_fixed) if side == "candidate" else \
            self.run(plan.candidate, plan.cand_dtype, plan.cand_fixed)
        floor_dir = self.scratch / "floor"
        floor_dir.mkdir()
        self.bar.update(stage="noise floor")
        key = (self.where, "floor", plan.cand_dtype)
        if key not in self.kept:
            self.kept[key] = noise_floor(plan.checkpoint, plan.spec, plan.cand_dtype, plan.tokens, scratch=floor_dir)
        return fixed_trace, self.kept[key]

    def _stem(self) -> Path:
        return self.scratch / f"trace{next(self.stems)}"

    def run(self, choice: ImplChoice, run_dtype: str, tg: dict[str, str]) -> Trace:
        from bughunt.worker import WorkerFailure

        plan = self.plan
        try:
            load = Load(choice, plan.checkpoint, plan.spec, run_dtype, plan.options.device, toggles=tg,
                        runner_kwargs=runner_kwargs(choice))
            return run_trace(load, TraceJob(plan.tokens, self._stem()), self.pool, plan.options.timeout)
        except WorkerFailure as e:
            raise BughuntError(f"{choice.label} failed during the sweep: {e}") from None

    def judged(self, key: tuple, varied: Trace, screening: bool = False) -> dict:
        side = self.plan.options.side
        points = compare_traces(self.fixed_trace, varied) if side == "reference" else compare_traces(varied, self.fixed_trace)
        points, first = judge(points, self.floor, self.plan.options.floor_factor)
        if not self.keep or screening:
            _discard(varied)  # its metrics are kept; the arrays are not needed again
        return {"toggles": dict(key), "label": _label(dict(key)), "score": score(points), "fit": fit(points),
                "first_above_floor": first, "points": points,
                "max_ratio_to_floor": max((p.get("ratio_to_floor") or 0.0) for p in points)}

    def fingerprint(self, k: tuple) -> str | None:
        """What an in-process reference pass under setting k computes: its spec, policy and input ids. Settings with
        the same fingerprint give bit-identical traces (another spelling of one setting), so one pass serves them all."""
        if k not in self.prints:
            self.prints[k] = None
            if self.plan.together:
                self.prints[k] = self._fingerprint(k)
        return self.prints[k]

    def _fingerprint(self, k: tuple) -> str | None:
        from bughunt.implementations.reference import ReferenceRunner
        from bughunt.toggles import apply_to_tokens

        plan = self.plan
        _, varied_dtype, varied_fixed = plan.varied
        try:
            r = ReferenceRunner(plan.checkpoint, plan.spec, varied_dtype, plan.options.device, toggles={**varied_fixed, **dict(k)})
            ids = apply_to_tokens(np.atleast_2d(plan.tokens), r.spec, r.toggles)
            return repr((r.spec.replace(notes=()), r.policy, ids.shape, ids.tobytes()))
        except BughuntError:
            return None

    def unique(self, todo: list[tuple], done) -> tuple[list[tuple], dict[tuple, tuple]]:
        """The settings to run, and for each other one the setting whose pass it shares (one of `todo`, or one of
        `done`, the settings already run)."""
        first: dict[str, tuple] = {f: k for k in done if (f := self.fingerprint(k)) is not None}
        same: dict[tuple, tuple] = {}
        for k in todo:
            f = self.fingerprint(k)
            if f is not None and f in first:
                same[k] = first[f]
            elif f is not None:
                first[f] = k
        return [k for k in todo if k not in same], same

    def _keys(self, settings: list[dict[str, str]]) -> list[tuple]:
        return [tuple(sorted(changed(self.plan.spec, tg).items())) for tg in settings]

    def _unreadable(self, k: tuple) -> bool:
        """Whether field hypotheses in k together leave a config no implementation could read: not a setting."""
        fields = {n[len(PREFIX):]: v for n, v in k if is_field(n)}
        return bool(fields) and changes_for(self.plan.spec, fields) is None

    def evaluate_many(self, settings: list[dict[str, str]]) -> list[dict]:
        """Each setting judged in full (each distinct pass run once, in batches for an in-process reference)."""
        cache, kept, where = self.cache, self.kept, self.where
        keys = self._keys(settings)
        todo = [k for k in dict.fromkeys(keys) if k not in cache]
        for k in todo:
            if self._unreadable(k):
                cache[k] = {"toggles": dict(k), "label": _label(dict(k)), "score": 10.0, "fit": 10.0, "first_above_floor": None,
                            "points": [], "max_ratio_to_floor": 0.0}
        todo = [k for k in todo if k not in cache]
        for k in [k for k in todo if self.keep and (where, k) in kept]:
            cache[k] = self.judged(k, kept[where, k])
        todo = [k for k in todo if k not in cache]
        todo, same = self.unique(todo, list(cache))
        for start in range(0, len(todo), self.batch):
            self._run_full(todo[start:start + self.batch])
        for k, twin in same.items():
            cache[k] = _alias(cache[twin], k)
            if self.keep and (where, twin) in kept:
                kept[where, k] = kept[where, twin]
        return [cache[k] for k in keys]

    def _run_full(self, chunk: list[tuple]) -> None:
        plan = self.plan
        choice, dtype, fixed = plan.varied
        if plan.together:
            traces = _run_reference_batch(choice, plan, dtype, [{**fixed, **dict(k)} for k in chunk],
                                          [None if self.keep else self._stem() for _ in chunk])
            if self.keep:
                self.kept.update({(self.where, k): t for k, t in zip(chunk, traces)})
        else:
            traces = [self.run(choice, dtype, {**fixed, **dict(k)}) for k in chunk]
        self.passes["full"] += len(chunk)
        for k, varied in zip(chunk, traces):
            self.cache[k] = self.judged(k, varied)
            self.bar.advance()

    def screen_many(self, settings: list[dict[str, str]], layers: int) -> list[dict]:
        """Each setting judged on the embedding and the first `layers` decoder layers only (entries of settings already
        run in full are cut to the same points), side by side in one read of those layers."""
        cache, screened = self.cache, self.screened
        keys = self._keys(settings)
        todo = [k for k in dict.fromkeys(keys) if k not in cache and (k, layers) not in screened]
        for k in todo:
            if self._unreadable(k):
                self.evaluate_many([dict(k)])  # no implementation could read that config: scored as such, nothing run
        todo = [k for k in todo if k not in cache]
        todo, same = self.unique(todo, [k for k, depth in screened if depth == layers])
        choice, dtype, fixed = self.plan.varied
        for start in range(0, len(todo), self.batch):
            chunk = todo[start:start + self.batch]
            traces = _run_reference_batch(choice, self.plan, dtype, [{**fixed, **dict(k)} for k in chunk],
                                          [self._stem() for _ in chunk], layers=layers)
            self.passes["screening"] += len(chunk)
            for k, varied in zip(chunk, traces):
                screened[k, layers] = self.judged(k, varied, screening=True)
        for k, twin in same.items():
            screened[k, layers] = _alias(screened[twin, layers], k)
        out = []
        for k in keys:
            if k in cache:  # run in full already: the same points as a screening pass has
                points = [p for p in cache[k]["points"] if _within(p["point"], layers)]
                out.append({**cache[k], "points": points, "fit": fit(points)})
            else:
                out.append(screened[k, layers])
        return out

    def configurations(self) -> tuple[list[dict], dict | None]:
        """The settings the mode asks for, judged (the setting as it is first), and in search mode what it found."""
        plan, mode = self.plan, self.plan.options.mode
        baseline = self.evaluate_many([{}])[0]
        if mode == "one-at-a-time":
            return [baseline] + self.evaluate_many([{n: v} for n, v in plan.items]), None
        if mode == "cumulative":
            return [baseline] + self.evaluate_many([dict(plan.items[:k + 1]) for k in range(len(plan.items))]), None
        question = Question(plan.spec, plan.items, plan.cannot_apply, defaults(plan.spec), plan.label("candidate"),
                            plan.options.side, plan.options.max_exhaustive)
        can_screen = plan.together and plan.options.side == "reference"
        search_info = search(question, Judges(self.evaluate_many, self.screen_many if can_screen else None), self.bar)
        search_info["evaluated"] = len(self.cache)
        search_info["screened"] = len({k for k, _ in self.screened})
        search_info["passes"] = dict(self.passes)
        return [baseline] + [c for c in search_info.pop("plotted") if c is not baseline], search_info


def _alias(entry: dict, k: tuple) -> dict:
    return {**entry, "toggles": dict(k), "label": _label(dict(k))}


def _result(state: Sweep, configs: list[dict], search_info: dict | None) -> Result:
    """The sweep's result: a comparison per configuration plotted, the findings, and every setting judged."""
    plan, options = state.plan, state.plan.options
    data = {
        "schema": "bughunt.result", "schema_version": SCHEMA_VERSION, "kind": "sweep",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": _command(plan),
        "checkpoint": {"path": str(plan.checkpoint), "spec": plan.spec.to_dict(), "source": sources.describe(plan.checkpoint)},
        "inputs": {"tokens": plan.tokens.tolist()},
        "settings": {"dtype": options.dtype, "device": options.device, "reference": plan.label("reference"),
                     "floor_factor": options.floor_factor, "branches": True},
        "environment": environment(),
        "implementations": _implementations(state),
        "noise_floor": {plan.cand_dtype: state.floor},
        "comparisons": _comparisons(plan, configs),
        "findings": _findings(state, configs[0], search_info),
        "sweep": {
            "mode": options.mode, "side": options.side, "candidate": plan.label("candidate"), "reference": plan.label("reference"),
            "toggle_defaults": defaults(plan.spec),
            "configurations": [_configuration(c) for c in state.cache.values()],
            "search": search_info,
        },
    }
    if search_info:
        data["diagnosis"] = search_info["diagnosis"]
    attach(data, plan.encoded)
    result = Result(data)
    if options.out is not None:
        save(result, Path(options.out), {}, render=options.render)
    return result


def _configuration(c: dict) -> dict:
    return {"label": c["label"], "toggles": c["toggles"], "score": c["score"], "fit": c["fit"],
            "first_above_floor": c["first_above_floor"], "max_ratio_to_floor": c["max_ratio_to_floor"],
            "curve": {p["point"]: p.get("log10_l2") for p in c["points"] if is_residual_point(p["point"])},
            "rel_l2": {p["point"]: p.get("rel_l2") for p in c["points"]}}


def _implementations(state: Sweep) -> list[dict]:
    plan, side, device = state.plan, state.plan.options.side, state.plan.options.device
    return [
        {"label": plan.label("candidate"), "name": plan.candidate.name, "dtype": plan.cand_dtype, "device": device,
         "status": "ok", "error": None, "meta": state.fixed_trace.meta if side == "reference" else {},
         "python": plan.candidate.python, "isolation": _isolation(plan.candidate, state.pool)},
        {"label": plan.label("reference"), "name": plan.reference.name, "dtype": plan.ref_dtype, "device": device,
         "status": "ok", "error": None, "meta": state.fixed_trace.meta if side == "candidate" else {},
         "python": plan.reference.python, "isolation": _isolation(plan.reference, state.pool)}]


def _comparisons(plan: SweepPlan, configs: list[dict]) -> list[dict]:
    cand_label, ref_label = plan.label("candidate"), plan.label("reference")
    comparisons = []
    for c in configs:
        name = (f"{ref_label} + {c['label']}" if plan.options.side == "reference" else f"{cand_label} + {c['label']}") \
            if c["toggles"] else ("as is" if not (plan.cand_fixed or plan.ref_fixed) else "fixed toggles only")
        comparisons.append({"candidate": name, "reference": ref_label, "dtype": plan.cand_dtype, "points": c["points"],
                            "first_above_floor": c["first_above_floor"], "summary": _summary(c["points"])})
    return comparisons


def _findings(state: Sweep, baseline: dict, search_info: dict | None) -> list[dict]:
    plan, cand_dtype = state.plan, state.plan.cand_dtype
    cand_label, ref_label = plan.label("candidate"), plan.label("reference")
    findings = []
    if baseline["first_above_floor"]:
        p = next(p for p in baseline["points"] if p["point"] == baseline["first_above_floor"])
        ratio = f"{multiple(p['ratio_to_floor'])} the {cand_dtype} noise floor" if p.get("ratio_to_floor") is not None else "NaN/Inf"
        findings.append(Finding("warning", "divergence", f"{cand_label} departs from {ref_label} as is at "
                                f"{baseline['first_above_floor']} ({ratio})", cand_label, baseline["first_above_floor"]).to_dict())
    if plan.options.side == "reference" and state.fixed_trace.meta.get("cannot_represent"):
        findings.append(unrepresentable_finding(cand_label, state.fixed_trace.meta["cannot_represent"], baseline["first_above_floor"],
                                                baseline["points"], cand_dtype))
    if search_info:
        findings.append(Finding("info" if search_info["at_floor"] else "warning", "diagnosis", search_info["diagnosis"],
                                cand_label, search_info["residual"]["first_above_floor"]).to_dict())
    return findings


def _isolation(choice: ImplChoice, pool) -> str:
    return "in-process" if pool is None or choice.in_main_process else "worker"


def _batch_size(spec, tokens: np.ndarray) -> int:
    """How many reference passes may step side by side: their float64 activations (the shared layer's weights are
    counted once) within a quarter of available memory, at most 16."""
    from bughunt.memory import available_memory

    b, s = tokens.shape
    per_pass = b * s * (6 * spec.hidden_size + 4 * spec.intermediate_size) * 8 + b * s * spec.vocab_size * 8 // 4 + (32 << 20)
    return int(max(1, min(16, available_memory() // 4 // per_pass)))


def _run_reference_batch(choice: ImplChoice, plan: SweepPlan, dtype: str, settings: list[dict[str, str]], stems: list[Path],
                         layers: int | None = None) -> list[Trace]:
    """Reference passes under several toggle settings, side by side in one read of the model (with `layers`, of its
    first decoder layers only)."""
    from bughunt.implementations.reference import ReferenceRunner, run_together

    runners = [ReferenceRunner(plan.checkpoint, plan.spec, dtype, plan.options.device, label=choice.label, toggles=tg)
               for tg in settings]
    try:
        for r in runners:
            r.open()
        return run_together(runners, plan.tokens, stems, layers=layers)
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


def _command(plan: SweepPlan) -> str:
    """The command line that repeats this sweep."""
    o = plan.options
    parts = ["bughunt", "sweep", sources.given_name(plan.checkpoint), "--impl", plan.candidate.label, "--reference", plan.reference.label,
             "--dtype", o.dtype, "--device", o.device, "--mode", o.mode, "--side", o.side]
    for t in o.toggles:
        parts += ["--toggle", t]
    for k, v in plan.cand_fixed.items():
        parts += ["--candidate-toggle", f"{k}={v}"]
    for k, v in plan.ref_fixed.items():
        parts += ["--reference-toggle", f"{k}={v}"]
    parts += ["--tokens", ";".join(",".join(str(int(t)) for t in row) for row in plan.tokens)]
    return shlex.join(parts)
