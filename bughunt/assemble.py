"""The last stage: assemble the Result from what the run produced (plan, entries, floors, comparisons, findings, the
probes' parts) and save it: result.json, traces, and the plots and report rendered from the Result alone."""

from __future__ import annotations

import datetime as _dt
import shlex
from pathlib import Path

from bughunt import sources
from bughunt.errors import BughuntError
from bughunt.findings import Finding
from bughunt.plan import DEFAULT_FLOOR_FACTOR, Plan
from bughunt.result import SCHEMA_VERSION, Result, environment, write_atomically
from bughunt.trace import Trace


def command_line(plan: Plan) -> str:
    """The command that reruns this compare (ids in place of text), with each probe's flags."""
    o = plan.options
    parts = ["bughunt", "compare", sources.given_name(plan.checkpoint)]
    for c in plan.choices:
        parts += ["--impl", c.label]
    parts += ["--reference", plan.reference.label, "--dtype", o.dtype, "--device", o.device]
    parts += ["--tokens", ";".join(",".join(str(int(t)) for t in row) for row in plan.tokens)]
    if o.floor_factor != DEFAULT_FLOOR_FACTOR:
        parts += ["--floor-factor", str(o.floor_factor)]
    for probe, options in plan.probes:
        parts += probe.command(options)
    return shlex.join(parts)


def document(ctx, floors: dict, comparisons: list[dict], findings: list[Finding]) -> dict:
    """result.json's content for a compare run."""
    plan, o = ctx.plan, ctx.plan.options
    settings = {"dtype": o.dtype, "device": o.device, "reference": plan.reference.label, "floor_factor": o.floor_factor,
                "branches": o.branches, "inner": plan.probe_options("inner") is not None,
                "isolate": plan.probe_options("isolate") is not None}
    return {
        "schema": "bughunt.result",
        "schema_version": SCHEMA_VERSION,
        "kind": "compare",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(plan),
        "checkpoint": {"path": str(plan.checkpoint), "spec": plan.spec.to_dict(), "source": sources.describe(plan.checkpoint)},
        "inputs": {"tokens": plan.tokens.tolist()},
        "settings": settings,
        "schedule": {**plan.schedule.as_dict(), "order": list(ctx.order)},
        "environment": environment(),
        "implementations": [e.to_dict() for e in ctx.entries.values()],
        "noise_floor": floors,
        "comparisons": comparisons,
        "findings": [f.to_dict() for f in findings],
    }


def refuse_empty(ctx, result: Result) -> None:
    """The CLI's rule: a run in which no candidate could be compared writes nothing and says why."""
    if ctx.plan.options.require_comparison and not result.comparisons:
        failed = "; ".join(f"{e.label}: {(e.error or '').splitlines()[0][:300].rstrip('.')}" for e in ctx.entries.values()
                           if e.status != "ok")
        raise BughuntError(f"nothing could be compared: every candidate failed or was refused ({failed}). Nothing was written.")


def weights_note(plan: Plan) -> list[Finding]:
    """Tensors in the weights that config.json does not describe: every implementation ignores them, so the comparison
    stands; the mismatch is still reported."""
    if not plan.weights.unexpected:
        return []
    return [Finding("warning", "weights", "the weights hold tensors config.json does not describe, which no implementation "
                    f"reads: {plan.weights.describe_unexpected(plan.spec.num_layers)}. Check that config.json belongs to these "
                    "weights (bughunt lint lists them).")]


def save(result: Result, out: Path, traces: dict[str, Trace] | None = None, render: bool = True) -> None:
    """Write result.json, traces and (when render) the plots and report.html into `out`, atomically."""
    from bughunt import report

    def write(tmp: Path) -> None:
        for label, trace in list((traces or {}).items()):
            stem = tmp / "traces" / safe_name(label)
            traces[label] = trace.move(stem)  # a rename from the scratch folder, not a copy through memory
            for entry in result.data["implementations"]:
                if entry["label"] == label:
                    entry["trace"] = f"traces/{safe_name(label)}.safetensors"
        (tmp / "result.json").write_text(result.to_json())
        if render:
            report.render(result, tmp)

    write_atomically(out, write, kind=result.kind, protect=[("the checkpoint", Path(result.data["checkpoint"]["path"]))])


def safe_name(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)
