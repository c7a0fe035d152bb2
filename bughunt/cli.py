"""The `bughunt` command line: a thin layer over the Python API. User errors print one message and exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bughunt.errors import BughuntError


def format_summary(result) -> str:
    """The short terminal table: one row per candidate, naming the first capture point above the floor."""
    d = result.data
    lines = [f"{d['checkpoint']['spec']['family']} · {d['checkpoint']['path']} · reference {d['settings']['reference']} · "
             f"floor factor {d['settings']['floor_factor']:g}"]
    header = f"  {'implementation':<28} {'dtype':<5} {'first above floor':<18} {'max rel L2':>11} {'at':<12} {'logits KL':>10} {'top-1':>6}"
    lines.append(header)
    for e in d["implementations"]:
        if e["label"] == d["settings"]["reference"]:
            continue
        if e["status"] != "ok":
            lines.append(f"  {e['label']:<28} {e['dtype']:<5} FAILED: {e['error'][:90]}")
            continue
        c = result.comparison(e["label"])
        s = c["summary"]
        fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
        lines.append(f"  {e['label']:<28} {c['dtype']:<5} {c['first_above_floor'] or 'none':<18} {fmt(s['max_rel_l2'], '.2e'):>11} "
                     f"{s['max_rel_l2_point'] or '–':<12} {fmt(s['logits_kl'], '.2e'):>10} {fmt(s['logits_top1'], '.3f'):>6}")
    for f in d["findings"]:
        if f["severity"] != "info":
            lines.append(f"  {f['severity'].upper()}: {f['message']}")
    return "\n".join(lines)


def _tokens(args, spec=None):
    from bughunt.compare import parse_tokens, read_tokens_file

    if args.tokens and args.tokens_file:
        raise BughuntError("give either --tokens or --tokens-file, not both.")
    if args.tokens:
        return parse_tokens(args.tokens)
    if args.tokens_file:
        return read_tokens_file(Path(args.tokens_file))
    return None


def cmd_compare(args) -> int:
    from bughunt.compare import compare

    out = Path(args.out) if args.out else Path("reports") / f"{Path(args.checkpoint).resolve().name}-{args.dtype}"
    result = compare(args.checkpoint, implementations=args.impl or ["hf", "reference"], reference=args.reference,
                     dtype=args.dtype, device=args.device, tokens=_tokens(args), out=out, floor_factor=args.floor_factor,
                     branches=not args.no_branches, allow_pickle=args.allow_pickle)
    print(format_summary(result))
    print(f"wrote {out}/result.json, {out}/layers.png, {out}/layers.svg, {out}/report.html")
    if args.fail_on_finding and any(f["severity"] in ("error", "warning") for f in result.findings):
        return 1
    return 0


def cmd_demo(args) -> int:
    from bughunt.demo import run_demo

    run_demo(Path(args.out), families=args.family or None)
    return 0


def cmd_tiny(args) -> int:
    from bughunt.tiny import make_tiny_checkpoint

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise BughuntError(f"{out} exists and is not empty. Choose a new directory for the checkpoint.")
    make_tiny_checkpoint(args.family, out, seed=args.seed)
    print(f"wrote tiny {args.family} checkpoint (seed {args.seed}) to {out}")
    return 0


def cmd_render(args) -> int:
    from bughunt import report
    from bughunt.result import Result

    result = Result.load(Path(args.result))
    out = Path(args.out) if args.out else (Path(args.result) if Path(args.result).is_dir() else Path(args.result).parent)
    report.render(result, out)
    print(f"rendered {out}/report.html")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from bughunt.implementations import DEVICES, DTYPES

    p = argparse.ArgumentParser(prog="bughunt", description="Find numerics bugs in transformer implementations, layer by layer.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compare", help="compare implementations of one checkpoint against a reference")
    c.add_argument("checkpoint", help="Hugging Face-format checkpoint directory (config.json + *.safetensors)")
    c.add_argument("--impl", action="append", metavar="NAME[:DTYPE][@PYTHON]",
                   help="implementation to run (repeatable): hf, reference; default: hf and reference")
    c.add_argument("--reference", default="reference", help="which implementation is the reference (default: reference, float64)")
    c.add_argument("--dtype", default="fp32", choices=DTYPES, help="dtype for implementations given without :DTYPE (default fp32)")
    c.add_argument("--device", default="cpu", choices=DEVICES)
    c.add_argument("--tokens", help="token ids, comma-separated; several equal-length rows separated by ';'")
    c.add_argument("--tokens-file", help="file of token ids: a JSON list (of lists), or one row per line")
    c.add_argument("--out", help="output directory (default reports/<checkpoint>-<dtype>)")
    c.add_argument("--floor-factor", type=float, default=10.0, help="a finding is a point above this multiple of the noise floor")
    c.add_argument("--no-branches", action="store_true", help="capture only the residual stream, not layer.{i}.attn/.mlp")
    c.add_argument("--allow-pickle", action="store_true", help="allow loading pickled (.bin) weights; runs code from the file")
    c.add_argument("--fail-on-finding", action="store_true", help="exit 1 when any implementation departs or fails")
    c.set_defaults(func=cmd_compare)

    d = sub.add_parser("demo", help="generate tiny checkpoints and compare every installed implementation on each")
    d.add_argument("--out", default="reports/demo")
    d.add_argument("--family", action="append", help="limit to these families (repeatable)")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("tiny", help="write a tiny seeded checkpoint of a family")
    t.add_argument("family")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_tiny)

    r = sub.add_parser("render", help="re-render plots and report.html from a result.json")
    r.add_argument("result", help="result.json or the directory holding it")
    r.add_argument("--out", help="where to write (default: beside result.json)")
    r.set_defaults(func=cmd_render)
    return p


def quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BughuntError as e:
        print(f"bughunt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
