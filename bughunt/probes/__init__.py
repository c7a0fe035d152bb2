"""Probes: optional capabilities that ride along a compare run (generation, the weight check, each implementation's
own tokenizer path, isolated layers, points inside the layers, the logit lens). A probe is one module implementing
`Probe`: its options, the job it sends (or how it changes the trace job), what it attaches to the Result, its findings,
its command-line flags and its report section. Adding one is its module plus a line in `_MODULES`; compare, the
worker, the CLI, the report and the schema do not change."""

from __future__ import annotations

import argparse
import importlib
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from bughunt.findings import Finding

if TYPE_CHECKING:
    from bughunt.context import RunContext
    from bughunt.implementations import ImplChoice
    from bughunt.plan import Plan
    from bughunt.trace import Trace


class ProbeOptions(BaseModel):
    """A probe's options: compare() keywords and CLI flags, validated once at the edge."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class Probe:
    """The hooks a probe may implement; every one has a do-nothing default. Hooks run in this order: `check` while the
    plan is built (refusals), `trace_job` for each implementation's trace job, `before` and `after` around each
    implementation's trace (in its worker group), `after_all` once every implementation ran, `attach` when the Result
    is assembled (its data and findings), `command` when the command line is rebuilt; `summary` and `report` read the
    Result alone (terminal lines, report section)."""

    name: ClassVar[str]
    Options: ClassVar[type[ProbeOptions]]
    template: ClassVar[str | None] = None  # its report section: a template under bughunt/templates/
    title: ClassVar[str | None] = None  # that section's heading
    result_key: ClassVar[str | None] = None  # where its data sits in result.json (read by its template)

    def enabled(self, options: Any) -> bool:
        """Whether the run asked for it."""
        return False

    def check(self, plan: "Plan", options: Any) -> Any:
        """Refuse what cannot run (BughuntError) before anything costly; may return normalised options."""
        return options

    def trace_job(self, options: Any) -> dict:
        """Fields this probe sets on every trace job (e.g. {"inner": True})."""
        return {}

    def before(self, ctx: "RunContext", choice: "ImplChoice") -> None:
        """Before an implementation's trace, in the thread that runs its worker."""

    def after(self, ctx: "RunContext", choice: "ImplChoice", trace: "Trace") -> None:
        """After an implementation's trace (still in its worker group, its runner held)."""

    def after_all(self, ctx: "RunContext", traces: dict[str, "Trace"]) -> None:
        """After every implementation ran, before the workers close."""

    def attach(self, data: dict, ctx: "RunContext") -> list[Finding]:
        """Put this probe's part into the Result's data; return its findings."""
        return []

    def command(self, options: Any) -> list[str]:
        """Its flags on the rebuilt command line."""
        return []

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Its flags on `bughunt compare`."""

    def from_args(self, args: argparse.Namespace) -> dict:
        """compare() keywords from the parsed flags."""
        return {}

    def summary(self, result_data: dict) -> list[str]:
        """Its lines in the terminal summary `bughunt compare` prints (bughunt/summary.py)."""
        return []

    def report(self, result_data: dict, images: dict[str, str]) -> Any:
        """The plain data its report template reads as `data` (from the Result alone, and the plots' base64 PNGs by
        name), or None when the result holds nothing of it."""
        return result_data.get(self.result_key) if self.result_key else None


class FlagProbe(Probe):
    """A probe asked for by one on/off flag (`--inner`, `--isolate`, ...): its `Options` hold one bool, the compare()
    keyword, and `enabled`, `command`, `add_arguments` and `from_args` follow from it, `flag` and `help`."""

    flag: ClassVar[str]
    help: ClassVar[str]

    @property
    def option(self) -> str:
        (name,) = self.Options.model_fields
        return name

    def enabled(self, options: Any) -> bool:
        return getattr(options, self.option)

    def command(self, options: Any) -> list[str]:
        return [self.flag]

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(self.flag, action="store_true", help=self.help)

    def from_args(self, args: argparse.Namespace) -> dict:
        return {self.option: getattr(args, self.flag.lstrip("-").replace("-", "_"))}


# the probes, in the order they run and attach; a new probe is a module and a line here
_MODULES = (
    "bughunt.probes.tokenizer_path",
    "bughunt.probes.inner",
    "bughunt.probes.isolate",
    "bughunt.probes.weights",
    "bughunt.probes.generate",
    "bughunt.probes.logit_lens",
    "bughunt.probes.original",
)


def registered() -> list[Probe]:
    """Every probe, in order (each module defines `PROBE`)."""
    return [importlib.import_module(m).PROBE for m in _MODULES]


def option_names() -> dict[str, Probe]:
    """compare() keyword -> the probe whose option it is."""
    return {name: p for p in registered() for name in p.Options.model_fields}
