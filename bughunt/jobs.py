"""Typed requests an implementation answers, in this process or in its worker: what to open (`Load`) and what to do
with it (a `TraceJob`, or a probe's own job). Each job kind names the function that answers it on the runner's side;
a probe registers its kind here with `register`, and the worker dispatches on it without knowing the probe."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from bughunt.implementations import ImplChoice, runner_class
from bughunt.spec import Spec

if TYPE_CHECKING:
    from bughunt.trace import Trace


@dataclass(frozen=True)
class Load:
    """What an implementation is opened with: the choice as the user named it, the checkpoint and its spec, the dtype
    it computes at, the device, the loading options, and runner keyword arguments (config overrides; device_map for
    runners that support it)."""

    choice: ImplChoice
    checkpoint: Path
    spec: Spec
    dtype: str
    device: str = "cpu"
    branches: bool = True
    allow_pickle: bool = False
    toggles: dict = field(default_factory=dict)  # on top of the choice's own
    runner_kwargs: dict = field(default_factory=dict)
    label: str | None = None  # the runner's label, when it is not the choice's (a worker gets the bare choice)

    @property
    def all_toggles(self) -> dict[str, str]:
        return {**self.choice.toggle_dict, **self.toggles}

    def open(self, **overrides):
        """The runner, opened (a context manager: `with load.open() as runner`)."""
        options = {"branches": self.branches, "label": self.label or self.choice.label, "allow_pickle": self.allow_pickle,
                   "toggles": self.all_toggles, **self.runner_kwargs, **overrides}
        return runner_class(self.choice.name)(self.checkpoint, self.spec, self.dtype, self.device, **options)

    def identity(self) -> str:
        """What makes two loads the same loaded model (toggles aside): a worker keeps one open across jobs with it."""
        mtime = (Path(self.checkpoint) / "config.json").stat().st_mtime_ns
        return json.dumps([str(self.checkpoint), mtime, self.choice.name, self.choice.dtype, self.dtype, self.device,
                           self.branches, self.allow_pickle, self.runner_kwargs], default=str)

    def to_wire(self) -> dict:
        return {"checkpoint": str(Path(self.checkpoint).resolve()), "name": self.choice.name, "choice_dtype": self.choice.dtype,
                "label": self.label or self.choice.label, "dtype": self.dtype,
                "device": self.device, "branches": self.branches, "allow_pickle": self.allow_pickle,
                "toggles": self.all_toggles, "runner_kwargs": self.runner_kwargs}

    @classmethod
    def from_wire(cls, d: dict) -> "Load":
        from bughunt.spec import load_spec

        choice = ImplChoice(d["name"], d["choice_dtype"])  # the toggles travel resolved, in `toggles`
        checkpoint = Path(d["checkpoint"])
        return cls(choice, checkpoint, load_spec(checkpoint), d["dtype"], d["device"], d["branches"], d["allow_pickle"],
                   dict(d["toggles"]), dict(d["runner_kwargs"]), d["label"])


def runner_kwargs(choice: ImplChoice, device_map: str | None = None, **extra) -> dict:
    """Keyword arguments for the choice's runner: device_map only for a runner that supports it."""
    if device_map and runner_class(choice.name).supports_device_map:
        extra["device_map"] = device_map
    return extra


@dataclass(frozen=True)
class TraceJob:
    """A forward pass whose trace streams to `<stem>.safetensors`: with `inner`, the points inside each layer; with
    `feed` (a trace's stem; in this process also a Trace), each decoder layer fed that trace's input to it (--isolate)."""

    kind = "trace"
    tokens: np.ndarray
    stem: Path
    inner: bool = False
    feed: Path | Trace | None = None
    check_weights: bool = False

    def to_wire(self) -> dict:
        return {"tokens": np.asarray(self.tokens).tolist(), "stem": str(self.stem), "inner": self.inner,
                "feed": str(self.feed) if self.feed is not None else None, "check_weights": self.check_weights}

    @classmethod
    def from_wire(cls, d: dict) -> "TraceJob":
        return cls(np.asarray(d["tokens"]), Path(d["stem"]), d["inner"], Path(d["feed"]) if d["feed"] else None,
                   d["check_weights"])

    def run(self, runner, worker: dict | None = None):
        """Run it on an open runner and return the trace (on disk at `stem` when there is one): the weight check's
        record and `worker` (the worker's record) go into its metadata."""
        from bughunt.trace import Trace

        feed = Trace.load(self.feed) if isinstance(self.feed, Path) else self.feed  # in this process, a Trace itself
        trace = runner.run(self.tokens, self.stem, inner=self.inner, feed=feed)
        if worker is not None:
            trace.meta["worker"] = worker
        if self.check_weights and runner.exposes_weights:
            from bughunt.weightcheck import check_for_trace

            trace.meta["weight_check"] = check_for_trace(runner)
        if trace.stem is not None and (worker is not None or "weight_check" in trace.meta):
            trace.save_meta()
        return trace

    def answer(self, runner, worker: dict | None = None) -> dict:
        """The worker's answer: the trace is on disk at `stem`."""
        self.run(runner, worker)
        return {"trace": str(self.stem)}


def run_in_process(load: Load, job: TraceJob):
    """Open, run and close one implementation in this process (the trace streams to `job.stem` unless it is None)."""
    from bughunt.envs import refuse_in_process

    refuse_in_process(load.choice, "--in-process runs every implementation in this interpreter; drop --in-process")
    with load.open() as runner:
        return job.run(runner)


@dataclass(frozen=True)
class Kind:
    """A job kind: how it is read off the wire, and whether it needs an open runner (a tokenizer path does not)."""

    name: str
    read: Callable[[dict], Any]
    needs_runner: bool = True


KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> None:
    """Declare a job kind (once, at import of the module that defines it)."""
    KINDS[kind.name] = kind


register(Kind("trace", TraceJob.from_wire))


def to_wire(load: Load | None, job) -> dict:
    """One JSON-able request for a worker."""
    return {"kind": job.kind, "load": load.to_wire() if load is not None else None, "job": job.to_wire()}
