"""The generation probe (--generate N): every implementation also generates N tokens greedily through its own path
(bughunt/generation.py holds the comparison), and each candidate's tokens are compared with the reference's."""

from __future__ import annotations

import argparse
from typing import Any

from bughunt import generation
from bughunt.errors import BughuntError
from bughunt.findings import Finding
from bughunt.probes import Probe, ProbeOptions


class Options(ProbeOptions):
    generate: int | None = None
    top_k: Any = generation.DEFAULT_TOP_K
    decode_config: dict | None = None


class Records:
    """What the run generated: label -> Generation, and label -> why it could not."""

    def __init__(self):
        self.generations: dict = {}
        self.failures: dict[str, str] = {}


class Generate(Probe):
    name = "generate"
    Options = Options
    template = "sections/generation.html"
    title = "Greedy generation"
    result_key = "generation"

    def report(self, result_data: dict, images: dict[str, str]) -> dict | None:
        g = result_data.get(self.result_key)
        return generation_view(g) if g else None

    def summary(self, result_data: dict) -> list[str]:
        gen = result_data.get(self.result_key)
        if not gen or not gen.get("reference"):
            return []
        lines = []
        for c in gen["candidates"]:
            what = (f"identical to {gen['reference']['label']} for all {gen['steps']} steps" if c["first_diff"] is None else
                    f"first differs at step {c['first_diff']}, top-{gen['top_k']} check {'passes' if c['topk_ok'] == 1 else 'FAILS'}")
            lines.append(f"generation {c['candidate']}: {what}")
        return lines

    def enabled(self, options: Options) -> bool:
        return options.generate is not None or bool(options.decode_config)

    def check(self, plan, options: Options) -> Options:
        spec = plan.spec
        generation.check_settings(options.generate, options.top_k, spec.vocab_size, spec.max_position_embeddings,
                                  plan.tokens.shape[1])
        if not options.decode_config:
            return options
        from bughunt.inputs.config import validate_decode_config
        from bughunt.spec import load_config

        if not options.generate:
            raise BughuntError("--decode-config changes the decoding steps of generation; add --generate N (or use bughunt decode).")
        cfg = validate_decode_config(options.decode_config, load_config(plan.checkpoint), str(plan.checkpoint / "config.json"))
        return options.model_copy(update={"decode_config": cfg})

    def after(self, ctx, choice, trace) -> None:
        from bughunt import progress
        from bughunt.worker import WorkerFailure

        o = ctx.plan.probe_options(self.name)
        records = ctx.records.setdefault(self.name, Records())
        decode = None if choice is ctx.plan.reference else o.decode_config
        job = generation.GenerateJob(ctx.plan.tokens, o.generate, ctx.scratch / f"generation-{len(ctx.order)}-{abs(hash(choice.label))}",
                                     decode)
        with progress.task(choice.label, unit="step") as bar:
            bar.update(stage=f"generating {o.generate} tokens")
            try:
                records.generations[choice.label] = generation.generate_choice(ctx.load(choice), job, ctx.pool_for(choice),
                                                                               ctx.plan.options.timeout)
            except (BughuntError, WorkerFailure) as e:
                records.failures[choice.label] = str(e)

    def attach(self, data: dict, ctx) -> list[Finding]:
        o = ctx.plan.probe_options(self.name)
        records = ctx.records.get(self.name, Records())
        generation.attach(data, records.generations, records.failures, ctx.plan.reference.label, o.generate, o.top_k,
                          ctx.plan.tokens.shape[1], o.decode_config or {})
        return []

    def command(self, o: Options) -> list[str]:
        flags = ["--generate", str(o.generate)] + (["--top-k", str(o.top_k)] if o.top_k != generation.DEFAULT_TOP_K else [])
        for k, v in (o.decode_config or {}).items():
            flags += ["--decode-config", f"{k}={v}"]
        return flags

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--generate", type=int, metavar="N", help="also generate N tokens greedily with each implementation's own "
                            "generation path (hf generate with its KV cache, keras-hub generate, DeepMind's sampler; the reference "
                            "recomputes the prefix) and compare each candidate's tokens with the reference's")
        parser.add_argument("--top-k", type=int, default=generation.DEFAULT_TOP_K, metavar="K",
                            help="with --generate: where tokens first differ, each must lie in the other's top-K (vLLM's check; default 5)")
        parser.add_argument("--decode-config", action="append", metavar="KEY=VALUE",
                            help="with --generate: config value changed on the candidates' one-token decoding steps only "
                                 "(plants a decode bug; hf)")

    def from_args(self, args: argparse.Namespace) -> dict:
        from bughunt.inputs.flags import key_values

        return {"generate": args.generate, "top_k": args.top_k, "decode_config": key_values(args.decode_config, "--decode-config")}


def generation_view(g: dict) -> dict:
    """Greedy generation: each implementation's tokens (first row of the batch) with the steps that differ from the
    reference's marked, and the reference's top-2 margins; the template reads the rest from `generation`."""
    ref = g.get("reference")
    if ref is None:
        return {"generation": g, "token_rows": [], "margins": []}
    rows = [_tokens_row(ref["label"], ref["path"], ref["tokens"][0], None)]
    rows += [_tokens_row(c["candidate"], c["path"], c["tokens"][0], ref["tokens"][0]) for c in g["candidates"]]
    return {"generation": g, "token_rows": rows, "margins": ref["margins"][0]}


def _tokens_row(label: str, path: str, tokens: list[int], against: list[int] | None) -> dict:
    cells = [{"id": tok, "differs": against is not None and tok != against[t]} for t, tok in enumerate(tokens)]
    return {"label": label, "path": path, "tokens": cells}


PROBE = Generate()
