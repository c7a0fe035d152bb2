"""The weight-check probe (--weight-check): every implementation that exposes its loaded parameters also checks them
against the checkpoint's tensors after its trace (bughunt/weightcheck.py), in its worker; a finding per departure.
`check` is the same check alone (bughunt weights), as a "weights" job."""

from __future__ import annotations


from dataclasses import dataclass
from pathlib import Path

from bughunt import envs, jobs
from bughunt.errors import BughuntError
from bughunt import weightcheck
from bughunt.findings import Finding
from bughunt.probes import FlagProbe, ProbeOptions


class Options(ProbeOptions):
    weight_check: bool = False


def weight_findings(entries: list[dict]) -> list[Finding]:
    """A finding for each implementation whose loaded parameters depart from the checkpoint (or could not be checked)."""
    out = []
    for entry in entries:
        wc = (entry.get("meta") or {}).get("weight_check")
        if not wc:
            continue
        if wc.get("error"):
            out.append(Finding("info", "weights", f"{entry['label']}: the weight check could not run: {wc['error']}", entry["label"]))
        elif wc["rows"]:
            out.append(Finding("warning", "weights", wc["summary"], entry["label"]))
    return out


class Weights(FlagProbe):
    name = "weights"
    Options = Options
    flag = "--weight-check"
    help = ("also check each implementation's loaded parameters against the checkpoint (where the implementation "
            "exposes them); a finding per tensor that departs")
    template = "sections/weights.html"
    title = "Weights"

    def report(self, result_data: dict, images: dict[str, str]) -> list | None:
        checks = [e["meta"]["weight_check"] for e in result_data.get("implementations", [])
                  if (e.get("meta") or {}).get("weight_check")]
        return checks or None

    def trace_job(self, options: Options) -> dict:
        return {"check_weights": True}

    def attach(self, data: dict, ctx) -> list[Finding]:
        return weight_findings(data["implementations"])


PROBE = Weights()


def check(checkpoint: str | Path, impl: str, dtype: str = "fp32", device: str = "cpu", pool=None,
          in_process: bool = False, timeout: float | None = None) -> weightcheck.WeightCheck:
    """Load `checkpoint` in implementation `impl` (NAME[:DTYPE][@PYTHON]) and check its parameters. Runs in a
    worker process (as compare does) unless `in_process`."""
    from bughunt.checkpoint import validate_weights
    from bughunt.implementations import ImplChoice, runner_class
    from bughunt.spec import load_spec

    from bughunt import sources

    checkpoint = sources.resolve(checkpoint)
    spec = load_spec(checkpoint)
    validate_weights(checkpoint, spec)
    choice = ImplChoice.parse(impl) if isinstance(impl, str) else impl
    cls = runner_class(choice.name)
    if not getattr(cls, "exposes_weights", False):
        why = " (the reference reads the checkpoint's tensors as they are stored)" if choice.name == "reference" else ""
        raise BughuntError(f"implementation '{choice.name}' does not expose its loaded parameters, so there is nothing to check"
                           f"{why}. Check one of: {', '.join(_exposing())}.")
    dtype = choice.dtype or dtype
    if in_process and choice.python is None:
        if _needs_worker(choice.name):
            raise BughuntError(f"{choice.name} fixes keras' backend per process and cannot load in-process here; drop --in-process.")
        with cls(checkpoint, spec, dtype, device, label=choice.label, toggles=choice.toggle_dict) as runner:
            return weightcheck.check_runner(runner)
    from bughunt.jobs import Load, to_wire
    from bughunt.worker import WorkerFailure, WorkerPool

    own = pool is None
    pool = pool or WorkerPool()
    load = Load(choice, checkpoint, spec, dtype, device)
    try:
        answer = pool.run(choice.name, envs.interpreter(choice), to_wire(load, WeightsJob()), timeout)
    except WorkerFailure as e:
        raise BughuntError(f"{choice.label} could not load {checkpoint} for the weight check: {e}") from None
    finally:
        if own:
            pool.close()
    return weightcheck.from_dict(answer["weights"])


@dataclass(frozen=True)
class WeightsJob:
    """The weight check alone (bughunt weights): no forward pass, the open runner's parameters against the checkpoint."""

    kind = "weights"

    def to_wire(self) -> dict:
        return {}

    @classmethod
    def from_wire(cls, d: dict) -> "WeightsJob":
        return cls()

    def answer(self, runner) -> dict:
        return {"weights": weightcheck.check_runner(runner).to_dict(all_rows=True)}


jobs.register(jobs.Kind("weights", WeightsJob.from_wire))


def _needs_worker(name: str) -> bool:
    from bughunt.implementations import REGISTRY

    return bool(REGISTRY[name][2])  # keras fixes its backend per process


def _exposing() -> list[str]:
    from bughunt.implementations import REGISTRY, available, runner_class

    return [n for n in REGISTRY if available(n) and getattr(runner_class(n), "exposes_weights", False)]
