"""The original-checkpoint probe (--original DIR|HUB_ID, on a GGUF checkpoint): is this file faithful to the model it was
made from, and where does it part? Two answers, both in the Result:
- the weight relation of every GGUF tensor to the original's (bughunt/gguf_original.py): quantized within the type's
  bound, or permuted, transposed, rounded to fp16 first, another tensor, missing;
- hf run on the original, compared with the reference run on the GGUF's weights and judged against what a faithful
  quantization explains: the reference on the original's weights quantized to the file's types (gguf-py's quantizers,
  activations quantized as llama.cpp does) against the reference on the original itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bughunt.errors import BughuntError
from bughunt.findings import Finding
from bughunt.probes import Probe, ProbeOptions

SIZES = ("family", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "vocab_size")


class Options(ProbeOptions):
    original: str | Path | None = None


@dataclass(frozen=True)
class Checked:
    """The options once checked: the original as given and its checkpoint directory."""

    original: str | Path
    resolved: Path


class Original(Probe):
    name = "original"
    Options = Options
    template = "sections/original.html"
    title = "Against the original checkpoint"
    result_key = "original"

    def enabled(self, options: Options) -> bool:
        return options.original is not None

    def check(self, plan, options: Options) -> Options:
        from bughunt import sources
        from bughunt.checkpoint import validate_weights
        from bughunt.spec import load_spec

        if sources.describe(plan.checkpoint)["kind"] != "gguf":
            raise BughuntError("--original relates a GGUF file to the checkpoint it was made from, but the checkpoint is "
                               "not a GGUF file. Pass the .gguf file as the checkpoint, or drop --original.")
        resolved = sources.resolve(options.original)
        spec = load_spec(resolved)
        validate_weights(resolved, spec)
        differ = [f"{k} {getattr(spec, k)} vs the GGUF's {getattr(plan.spec, k)}" for k in SIZES
                  if getattr(spec, k) != getattr(plan.spec, k)]
        if differ:
            raise BughuntError(f"--original {options.original} is not the model this GGUF was made from: {'; '.join(differ)}.")
        return Checked(options.original, resolved)

    def after_all(self, ctx, traces: dict) -> None:
        from bughunt.gguf_original import relate

        options = ctx.plan.probe_options(self.name)
        ctx.records[self.name] = {"weights": relate(ctx.plan.checkpoint, options.resolved).to_dict(),
                                  "hf": _hf_on_original(ctx, options.resolved)}

    def attach(self, data: dict, ctx) -> list[Finding]:
        record = ctx.records.get(self.name)
        if record is None:
            return []
        options = ctx.plan.probe_options(self.name)
        data[self.result_key] = {"checkpoint": str(options.original), "path": str(options.resolved), **record}
        findings = []
        weights = record["weights"]
        if weights["rows"]:
            findings.append(Finding("warning", "weights", weights["summary"], "original"))
        hf = record["hf"]
        if hf["first_above_floor"] is not None:
            findings.append(Finding("warning", "divergence", f"hf on the original departs from the reference on the GGUF's "
                                    f"weights at {hf['first_above_floor']}, beyond what a faithful {hf['floor_dtype']} "
                                    "quantization of the original explains", "hf@original", hf["first_above_floor"]))
        return findings

    def command(self, options: Checked) -> list[str]:
        return ["--original", str(options.original)]

    def add_arguments(self, parser) -> None:
        parser.add_argument("--original", metavar="DIR|HUB_ID", help="with a GGUF checkpoint: the checkpoint it was made "
                            "from; relates every GGUF tensor to it and also runs hf on it")

    def from_args(self, args) -> dict:
        return {"original": getattr(args, "original", None)}

    def summary(self, result_data: dict) -> list[str]:
        record = result_data.get(self.result_key)
        if not record:
            return []
        hf = record["hf"]
        where = hf["first_above_floor"] or "nowhere"
        return [f"original {record['checkpoint']}: {record['weights']['summary']}",
                f"original: hf on it departs from the reference on the GGUF {where} above the faithful "
                f"{hf['floor_dtype']} quantization's floor (max rel L2 {hf['max_rel_l2']:.2e})"]


def _hf_on_original(ctx, original: Path) -> dict:
    """hf at fp32 on the original, against the reference's trace on the GGUF's weights, judged against the floor of a
    faithful quantization to the file's types (computed on the original)."""
    from bughunt import sources
    from bughunt.execute import run_implementation
    from bughunt.floors import floor_from
    from bughunt.implementations import ImplChoice
    from bughunt.judging import judge
    from bughunt.metrics import compare_traces
    from bughunt.spec import load_spec

    plan = ctx.plan
    spec = load_spec(original)
    file, qtype = sources.native_gguf(plan.checkpoint)
    scratch = ctx.scratch
    hf = run_implementation(ImplChoice("hf", "fp32"), original, spec, "fp32", "cpu", plan.tokens, stem=scratch / "original-hf")
    fp64 = run_implementation(ImplChoice("reference"), original, spec, "fp64", "cpu", plan.tokens, stem=scratch / "original-fp64")
    faithful = run_implementation(ImplChoice("reference", qtype), original, spec, qtype, "cpu", plan.tokens,
                                  stem=scratch / "original-faithful", quantized_from=file)
    floor = floor_from(fp64, [faithful], qtype, plan.tokens)
    points = compare_traces(hf, ctx.traces[plan.reference.label], plan.tokens)
    points, first = judge(points, floor, plan.options.floor_factor)
    rel = [p["rel_l2"] for p in points if p.get("rel_l2") is not None]
    return {"implementation": "hf:fp32 on the original", "floor_dtype": qtype, "first_above_floor": first,
            "max_rel_l2": max(rel) if rel else None,
            "points": [{k: p.get(k) for k in ("point", "rel_l2", "ratio_to_floor", "above_floor")} for p in points],
            "floor_method": "the reference on the original's weights quantized to the GGUF's types (activations "
                            "quantized as llama.cpp does) vs the reference on the original"}


PROBE = Original()
