"""The third stage: run each implementation of a planned run. One typed job per implementation (bughunt/jobs.py), in
this process or in its worker; workers of different implementations side by side when the memory plan allows it, one
after another otherwise. A failure of one implementation is recorded in its entry, never a failure of the run."""

from __future__ import annotations

import os
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bughunt import envs, progress
from bughunt.context import RunContext
from bughunt.errors import BughuntError
from bughunt.floors import run_reference_with_floors, runs_floors
from bughunt.implementations import ImplChoice
from bughunt.jobs import Load, TraceJob, run_in_process, to_wire
from bughunt.spec import Spec
from bughunt.trace import Trace


def run_trace(load: Load, job: TraceJob, pool=None, timeout: float | None = None) -> Trace:
    """One implementation's trace: in this process when `pool` is None or it runs in the main process, otherwise as a
    job for its worker (the trace comes back through the file `job.stem`)."""
    if pool is None or load.choice.in_main_process:
        return run_in_process(load, job)
    pool.run(load.choice.name, envs.interpreter(load.choice), to_wire(load, job), timeout)
    return Trace.load(job.stem)


def run_implementation(choice: ImplChoice, checkpoint: Path, spec: Spec, dtype: str, device: str, tokens: np.ndarray,
                       **options) -> Trace:
    """Convenience for notebooks and tests: open, run and close one implementation in this process. `options`: stem,
    inner, feed (a Trace), check_weights, and the Load's fields (branches, allow_pickle, toggles) or runner keywords
    (config_overrides, device_map)."""
    job = {k: options.pop(k) for k in ("stem", "inner", "feed", "check_weights") if k in options}
    load_fields = {k: options.pop(k) for k in ("branches", "allow_pickle", "toggles") if k in options}
    load = Load(choice, Path(checkpoint), spec, dtype, device, runner_kwargs=options, **load_fields)
    return run_in_process(load, TraceJob(np.asarray(tokens), job.pop("stem", None), **job))


def trace_job(ctx: RunContext, index: int, **fields) -> TraceJob:
    """The trace job of implementation `index` in this run, with what the probes set on it (inner points, the weight
    check), then `fields` (e.g. another stem and a feed)."""
    merged = {"stem": ctx.scratch / f"trace{index}", **ctx.plan.trace_fields, **fields}
    return TraceJob(ctx.plan.tokens, **merged)


def attempt(ctx: RunContext, choice: ImplChoice, index: int) -> Trace | None:
    """Run one implementation and its probes' `after` hooks; a failure goes into its entry."""
    from bughunt.worker import WorkerFailure

    entry = ctx.entry(choice)
    trace = None
    try:
        with progress.task(choice.label, unit="step") as bar:
            if runs_floors(ctx.plan, choice):
                trace = run_reference_with_floors(ctx, bar)
            else:
                bar.update(stage="loading and running" + ("" if ctx.in_main_process(choice) else " in its worker"))
                trace = run_trace(ctx.load(choice), trace_job(ctx, index), ctx.pool_for(choice), ctx.plan.options.timeout)
        entry.meta = trace.meta
        for probe, _ in ctx.plan.probes:
            probe.after(ctx, choice, trace)
    except (BughuntError, WorkerFailure) as e:
        entry.fail(str(e), getattr(e, "traceback", None))
    except Exception as e:  # a crash inside a library is a failure of that implementation, not of the run
        entry.fail(f"{type(e).__name__}: {e}", traceback.format_exc(limit=8))
    return trace


def _run_group(ctx: RunContext, items: list[tuple[int, ImplChoice]]) -> dict[int, Trace | None]:
    """One worker's implementations, in order (the probes' `before` hooks first)."""
    for probe, _ in ctx.plan.probes:
        probe.before(ctx, items[0][1])
    out = {}
    for i, choice in items:
        ctx.order.append(choice.label)
        out[i] = attempt(ctx, choice, i)
        if not ctx.plan.schedule.side_by_side:
            ctx.stop_worker(choice)
    return out


def execute(ctx: RunContext) -> None:
    """Run every implementation of the plan into the context (entries and traces), then the probes' `after_all`."""
    groups: dict[tuple, list[tuple[int, ImplChoice]]] = {}
    for i, choice in enumerate(ctx.plan.choices):
        ctx.entry(choice)  # entries keep the plan's order
        groups.setdefault((choice.name, envs.interpreter(choice)), []).append((i, choice))
    parallel = max(1, min(len(groups), os.cpu_count() or 1)) if ctx.plan.schedule.side_by_side else 1
    results: dict[int, Trace | None] = {}
    with ThreadPoolExecutor(max_workers=parallel) as executor:
        for part in executor.map(lambda items: _run_group(ctx, items), groups.values()):
            results.update(part)
    for i, choice in enumerate(ctx.plan.choices):
        if results.get(i) is not None:
            ctx.traces[choice.label] = results[i]
    for probe, _ in ctx.plan.probes:
        probe.after_all(ctx, ctx.traces)
