"""The second stage: what a planned run holds while it runs. A `RunContext` builds the library-version environments
the plan needs, owns the worker pool and the scratch folder the traces stream to, and keeps what the run produced
(implementation entries, traces, floor passes, probe records) until the Result is assembled."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bughunt import envs
from bughunt.jobs import Load, runner_kwargs
from bughunt.implementations import ImplChoice
from bughunt.plan import Plan
from bughunt.trace import Trace


@dataclass
class Entry:
    """One implementation's part of the run: how it ran, whether it failed, its trace's metadata."""

    label: str
    name: str
    dtype: str
    device: str
    python: str | None
    isolation: str
    status: str = "ok"
    error: str | None = None
    meta: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # traceback, trace path, isolated_layers, ...

    def fail(self, error: str, traceback: str | None = None) -> None:
        self.status, self.error = "failed", error
        if traceback:
            self.extra["traceback"] = traceback

    def to_dict(self) -> dict:
        return {"label": self.label, "name": self.name, "dtype": self.dtype, "device": self.device, "python": self.python,
                "isolation": self.isolation, "status": self.status, "error": self.error, "meta": self.meta, **self.extra}


class RunContext:
    """Environments, the worker pool, scratch space and the run's products; a context manager that releases them."""

    def __init__(self, plan: Plan, pool=None):
        self.plan = plan
        isolate = plan.options.isolate
        envs.prepare(plan.choices, in_process=not isolate)  # builds missing library-version environments (minutes)
        from bughunt.worker import WorkerPool

        self.own_pool = pool is None and isolate
        self.pool = pool or (WorkerPool() if isolate else None)
        self._scratch = tempfile.TemporaryDirectory(prefix="bughunt-traces-")
        self.scratch = Path(self._scratch.name)
        self.entries: dict[str, Entry] = {}
        self.traces: dict[str, Trace] = {}
        self.floor_traces: dict[str, list[Trace]] = {}  # dtype -> the reference emulating it (a pass per summation order), run beside the float64 pass
        self.records: dict[str, Any] = {}  # probe name -> what it keeps for `attach`
        self.order: list[str] = []  # labels in the order they started

    def in_main_process(self, choice: ImplChoice) -> bool:
        return not self.plan.options.isolate or choice.in_main_process

    def pool_for(self, choice: ImplChoice):
        """The worker pool a choice's jobs go to; None when it runs in this process."""
        return None if self.in_main_process(choice) else self.pool

    def load(self, choice: ImplChoice, **toggles: str) -> Load:
        """How `choice` is opened in this run."""
        p, o = self.plan, self.plan.options
        return Load(choice, p.checkpoint, p.spec, p.dtype_of(choice), o.device, o.branches, o.allow_pickle, dict(toggles),
                    runner_kwargs(choice, o.device_map))

    def entry(self, choice: ImplChoice) -> Entry:
        if choice.label not in self.entries:
            self.entries[choice.label] = Entry(choice.label, choice.name, self.plan.dtype_of(choice), self.plan.options.device,
                                               choice.python, "in-process" if self.in_main_process(choice) else "worker")
        return self.entries[choice.label]

    def stop_worker(self, choice: ImplChoice) -> None:
        """Its memory goes back before the next implementation starts (a schedule of one after another)."""
        if self.own_pool:
            self.pool.stop(choice.name, envs.interpreter(choice))

    def close_workers(self) -> None:
        if self.own_pool and self.pool is not None:
            self.pool.close()
            self.pool = None

    def __enter__(self) -> "RunContext":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close_workers()
        finally:
            self.traces.clear()
            self.floor_traces.clear()
            self.records.clear()
            self._scratch.cleanup()
