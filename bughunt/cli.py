"""The `bughunt` command line: a thin layer over the Python API. User errors print one message and exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bughunt.errors import BughuntError
from bughunt.summary import format_summary

EXIT_CODES = """\
exit codes (the same for every bughunt command):
  0    compared, and within thresholds (findings are reported; they fail only a command that gates on them)
  1    a finding or regression, where the command gates on it: compare, sweep and decode with --fail-on-finding,
       lint on an error-severity check, ci on a regression, weights on a parameter that departs from the checkpoint
  2    bad input (one message says what was wrong and how to fix it; nothing is written), or nothing could be
       compared (every candidate refused or failed)
  130  interrupted by SIGINT (Ctrl-C), 143 by SIGTERM: workers stopped, temporary files removed, nothing half-written

--out: bughunt writes a new directory, or replaces its own earlier output (marked by a .bughunt-output file) once
the new one is complete. It refuses a file, the checkpoint, a path inside or around the checkpoint, a non-empty
directory it did not write, and a place it cannot create, before any work starts. Outputs follow your umask.
"""


def _positive_seconds(text: str) -> float:
    """argparse type for --timeout: a finite number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, e.g. 600; got {text!r}")
    return value


def _seed(text: str) -> int:
    """argparse type for --seed: a non-negative integer (numpy's generators take no negative seeds)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, e.g. 0; got {text!r}")
    return value


def _path(text: str) -> str:
    """argparse type for --out, --json, --baseline: an empty path would silently mean the default (or the cwd)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a path, e.g. reports/run")
    return text


def _require_device(device: str) -> None:
    from bughunt.implementations import require_device

    require_device(device)


def _gate(args, result) -> int:
    """Exit 1 when the command was asked to gate on findings (--fail-on-finding) and one fired, else 0."""
    if getattr(args, "fail_on_finding", False) and any(f["severity"] in ("error", "warning") for f in result.findings):
        return 1
    return 0


def _tokens(args, spec=None):
    from bughunt.inputs.tokens import parse_token_text, read_token_file

    if args.tokens is not None and args.tokens_file is not None:
        raise BughuntError("give either --tokens or --tokens-file, not both.")
    if args.tokens is not None:  # an empty --tokens '' is refused, not read as "use the default tokens"
        return parse_token_text(args.tokens, "--tokens")
    if args.tokens_file is not None:
        return read_token_file(Path(args.tokens_file))
    return None


class _TextOption(argparse.Action):
    """--prompt and --prompt-file append to one list, so the rows keep the order they were given in."""

    def __call__(self, parser, namespace, value, option_string=None):
        items = list(getattr(namespace, "text", None) or [])
        items.append(("prompt-file" if option_string == "--prompt-file" else "prompt", value))
        setattr(namespace, "text", items)


def _add_text_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action=_TextOption, dest="text", metavar="TEXT",
                   help="input text, through the checkpoint's tokenizer (BOS as its config says); repeatable: each prompt is a "
                        "row of one batch, every row cut to the shortest row's length (the cut is reported). Default, when "
                        "neither ids nor text are given: a short text shipped with bughunt (seeded ids without a tokenizer)")
    p.add_argument("--prompt-file", action=_TextOption, dest="text", metavar="FILE",
                   help="a UTF-8 file whose whole text (less one final newline) is one prompt; repeatable, mixes with --prompt")
    p.add_argument("--chat", metavar="FILE", help='a JSON list of messages ([{"role": "user", "content": "..."}]) rendered '
                   "through the checkpoint's chat template (with the generation prompt when the last role is not assistant)")


def _text(args):
    """The text the user gave (a TextRequest), or the shipped default text when neither ids nor text were given."""
    from bughunt.text import default_request, request

    text = request(getattr(args, "text", None), getattr(args, "chat", None))
    if text is None and args.tokens is None and args.tokens_file is None:
        return default_request()
    return text


def _max_memory(args) -> int | None:
    from bughunt.memory import parse_size

    return parse_size(args.max_memory) if getattr(args, "max_memory", None) else None


def cmd_compare(args) -> int:
    from bughunt.comparison import compare
    from bughunt.output import describe_written

    _require_device(args.device)
    out = Path(args.out) if args.out else Path("reports") / f"{Path(args.checkpoint).resolve().name}-{args.dtype}"
    from bughunt import probes

    probe_options = {k: v for probe in probes.registered() for k, v in probe.from_args(args).items()}
    result = compare(args.checkpoint, args.impl or ["hf", "reference"], reference=args.reference, dtype=args.dtype,
                     device=args.device, tokens=_tokens(args), out=out, floor_factor=args.floor_factor,
                     branches=not args.no_branches, allow_pickle=args.allow_pickle, isolate=not args.in_process,
                     timeout=args.timeout, max_memory=_max_memory(args), device_map=args.device_map,
                     require_comparison=True, text=_text(args), **probe_options)
    print(format_summary(result))
    print(describe_written(out))
    return _gate(args, result)


def cmd_sweep(args) -> int:
    from bughunt.output import describe_written
    from bughunt.sweep import sweep

    _require_device(args.device)
    out = Path(args.out) if args.out else Path("reports") / f"{Path(args.checkpoint).resolve().name}-sweep-{args.mode}"
    result = sweep(args.checkpoint, impl=args.impl, reference=args.reference, dtype=args.dtype, device=args.device,
                   toggles=args.toggle or [], mode=args.mode, side=args.side, candidate_toggles=args.candidate_toggle or [],
                   reference_toggles=args.reference_toggle or [], tokens=_tokens(args), out=out, floor_factor=args.floor_factor,
                   text=_text(args))
    sw = result.data["sweep"]
    print(f"sweep {sw['mode']} ({sw['side']} side): {sw['candidate']} vs {sw['reference']}")
    print(f"  {'configuration':<48} {'score':>7} {'first above floor':<18}")
    if sw["search"]:  # best first; settings with the same divergence at every point share a row, the search's pick marked
        from bughunt.report import group_configurations

        for row in group_configurations(sw)[:20]:
            first, *more = row["labels"]
            mark = "*" if row["chosen"] else " "
            print(f" {mark}{first:<48} {row['score']:>7.3f} {row['first_above_floor'] or 'none':<18}{'  <- chosen' if row['chosen'] else ''}")
            for other in more:
                print(f"    = {other}")
    else:
        for c in sw["configurations"]:
            print(f"  {c['label']:<48} {c['score']:>7.3f} {c['first_above_floor'] or 'none':<18}")
    if sw["search"]:
        s = sw["search"]
        from bughunt.sweep import search_counts

        print(f"  search: {search_counts(s)}")
        for x in s.get("explanations") or []:
            if len(x["spellings"]) > 1 or x["toggle"].startswith("field:"):
                print(f"  {x['toggle']}={x['value']}: {x['description']}")
                if len(x["spellings"]) > 1:
                    print("    the same explanation, spelled otherwise: " + ", ".join(
                        "{" + ", ".join(f"{k}={v}" for k, v in sp.items()) + "}" for sp in x["spellings"][1:]))
        for a in s["ablation"]:
            print(f"  without {a['toggle']}={a['value']}: fit worse by {a['delta']:.2f} decades (first above floor: {a['first_above_floor_without']})")
        for f in result.findings:
            if f["kind"] == "unrepresentable":
                print(f"  {f['severity'].upper()}: {f['message']}")
        print(f"DIAGNOSIS: {s['diagnosis']}")
    print(describe_written(out))
    return _gate(args, result)


def cmd_decode(args) -> int:
    from bughunt.decode import decode_check
    from bughunt.output import describe_written

    _require_device(args.device)
    from bughunt.inputs.flags import key_values

    config = key_values(args.decode_config, "--decode-config")
    tokens = _tokens(args)
    out = Path(args.out) if args.out else Path("reports") / f"{Path(args.checkpoint).resolve().name}-decode"
    result = decode_check(args.checkpoint, impl=args.impl, reference=args.reference, dtype=args.dtype, device=args.device,
                          tokens=tokens, prefill=args.prefill, decode_config=config, floor_factor=args.floor_factor, out=out,
                          text=_text(args))
    d = result.data["decode"]
    print(f"{d['candidate']}: {d['path']} decoding after a prefill of {d['prefill']}; first step departing from its own "
          f"full pass: {d['self']['first_departing_step']}")
    if "reference" in d:
        print(f"  first step departing from {d['reference']['label']}: {d['reference']['first_departing_step']}")
    for f in result.findings:
        print(f"  {f['severity'].upper()}: {f['message']}")
    print(describe_written(out))
    return _gate(args, result)


def cmd_demo(args) -> int:
    from bughunt.demo import run_demo

    run_demo(Path(args.out), families=args.family or None)
    return 0


def cmd_envs(args) -> int:
    from bughunt import envs
    from bughunt.implementations import ImplChoice

    if args.action == "list":
        print(envs.format_list(envs.list_envs()))
    elif args.action == "create":
        choices = [ImplChoice.parse(n) for n in args.names]
        for c in choices:
            if not c.version or c.dtype or c.toggles:
                raise BughuntError(f"envs create: '{c.label}' is not NAME==VERSION. Name a library release, e.g. hf==5.22.0.")
        for c in choices:
            python = envs.ensure(c.name, c.version)
            print(f"{c.label}: {python or sys.executable + ' (this interpreter has that release)'}")
    else:
        if not args.names and not args.all:
            raise BughuntError("envs remove: name the environments to remove (as `bughunt envs list` shows them, or hf==VERSION), or pass --all.")
        for name in envs.remove(args.names, everything=args.all):
            print(f"removed {envs.root() / name}")
    return 0


def cmd_tiny(args) -> int:
    from bughunt.output import check_output_dir, describe_written, write_output_dir
    from bughunt.tiny import TINY_FAMILIES, make_tiny_checkpoint

    if args.family not in TINY_FAMILIES:
        raise BughuntError(f"no tiny checkpoint for family '{args.family}'. Choose one of: {', '.join(TINY_FAMILIES)}.")
    out = Path(args.out)
    check_output_dir(out, "tiny")
    write_output_dir(out, "tiny", lambda tmp: make_tiny_checkpoint(args.family, tmp, seed=args.seed, trained=args.trained))
    trained = ""
    if args.trained:
        import json

        t = json.loads((out / "bughunt_tiny.json").read_text())["trained"]
        trained = f", trained {t['steps']} steps on {t['corpus']}: loss {t['loss_first']:.3f} -> {t['loss_last']:.3f}"
    print(f"tiny {args.family} checkpoint (seed {args.seed}{trained}): {describe_written(out)}")
    return 0


def cmd_render(args) -> int:
    import shutil

    from bughunt import report
    from bughunt.output import check_output_dir, describe_written, read_marker, write_output_dir
    from bughunt.result import Result

    source = Path(args.result)
    source_dir = source if source.is_dir() else source.parent
    out = Path(args.out) if args.out else source_dir
    result = Result.load(source)
    if not args.out and read_marker(source_dir) is None and source_dir.is_dir() and any(source_dir.iterdir()):
        raise BughuntError(f"{source_dir} was not written by bughunt (no .bughunt-output file), so it is not re-rendered in place. "
                           "Give --out NEWDIR to render into a new directory.")
    named = result.data.get("checkpoint")
    checkpoint = named.get("path") if isinstance(named, dict) else None
    protect = [("the checkpoint", Path(checkpoint))] if isinstance(checkpoint, str) and checkpoint else []
    check_output_dir(out, "render", protect)

    def write(tmp: Path) -> None:
        if (source_dir / "traces").is_dir():
            shutil.copytree(source_dir / "traces", tmp / "traces")  # the result names them; keep the output whole
        (tmp / "result.json").write_text(result.to_json())
        report.render(result, tmp)

    write_output_dir(out, "render", write, protect)  # a fresh directory: no stale plot survives beside the new report
    print(describe_written(out))
    return 0


def cmd_implementations(args) -> int:
    from bughunt.implementations.catalog import catalog_json, describe_all, format_catalog

    infos = describe_all()
    print(catalog_json(infos) if args.json else format_catalog(infos))
    return 0


def cmd_ci(args) -> int:
    from bughunt.ci import run_ci

    if args.shard is not None:
        from bughunt.ci.shard import parse_shard, run_shard

        run = run_shard(Path(args.matrix), Path(args.baseline), parse_shard(args.shard), update_baseline=args.update_baseline,
                        out=Path(args.out) if args.out else None)
    else:
        run = run_ci(Path(args.matrix), Path(args.baseline), update_baseline=args.update_baseline,
                     out=Path(args.out) if args.out else None)
    if run.exit_code == 2:
        print("bughunt: error: nothing could be compared: every cell of the matrix failed (each cell's error is above).",
              file=sys.stderr)
    return run.exit_code


def cmd_ci_merge(args) -> int:
    from bughunt.ci.shard import merge

    return merge([Path(d) for d in args.shards], out=Path(args.out) if args.out else None).exit_code


def cmd_lint(args) -> int:
    from bughunt.lint import LINT_SCHEMA, format_table, lint
    from bughunt.output import check_output_file
    from bughunt.tokenizer_parity import format_parity_dict

    if args.json:
        check_output_file(args.json, LINT_SCHEMA, [("the checkpoint", Path(args.checkpoint))])
    report = lint(Path(args.checkpoint), tokenizers=args.tokenizers)
    print(format_table(report))
    if report.tokenizer_parity is not None:
        print(format_parity_dict(report.tokenizer_parity))
    if args.json:
        report.write_json(Path(args.json), protect=[("the checkpoint", Path(args.checkpoint))])
        print(f"wrote {args.json}")
    return report.exit_code


def cmd_weights(args) -> int:
    from bughunt.output import check_output_file
    from bughunt.probes.weights import check
    from bughunt.weightcheck import WEIGHTS_SCHEMA, format_check, write_json

    _require_device(args.device)
    protect = [("the checkpoint", Path(args.checkpoint))]
    if args.json:
        check_output_file(args.json, WEIGHTS_SCHEMA, protect)
    wc = check(args.checkpoint, args.impl, dtype=args.dtype, device=args.device, in_process=args.in_process,
               timeout=args.timeout)
    print(format_check(wc))
    if args.json:
        write_json(wc, Path(args.json), protect)
        print(f"wrote {args.json}")
    return 1 if wc.departures else 0


def _add_compare(command) -> None:
    """`bughunt compare` and its flags."""
    from bughunt.implementations import DEVICES, DTYPES
    from bughunt.implementations.catalog import impl_help

    c = command("compare", help="compare implementations of one checkpoint against a reference")
    c.add_argument("checkpoint", help="Hugging Face-format checkpoint directory (config.json + *.safetensors)")
    c.add_argument("--impl", action="append", metavar="NAME[:DTYPE][@PYTHON]", help=impl_help())
    c.add_argument("--reference", default="reference", help="which implementation is the reference (default: reference, float64)")
    c.add_argument("--dtype", default="fp32", choices=DTYPES, help="dtype for implementations given without :DTYPE (default fp32)")
    c.add_argument("--device", default="cpu", choices=DEVICES)
    c.add_argument("--tokens", help="token ids, comma-separated; several equal-length rows separated by ';'")
    c.add_argument("--tokens-file", help="file of token ids: a JSON list (of lists), or one row per line")
    _add_text_options(c)
    c.add_argument("--out", type=_path, help="output directory (default reports/<checkpoint>-<dtype>)")
    c.add_argument("--floor-factor", type=float, default=10.0, help="a finding is a point above this multiple of the noise floor")
    c.add_argument("--no-branches", action="store_true", help="capture only the residual stream, not layer.{i}.attn/.mlp")
    c.add_argument("--allow-pickle", action="store_true", help="allow loading pickled (.bin) weights; runs code from the file")
    c.add_argument("--fail-on-finding", action="store_true", help="exit 1 when any implementation departs or fails")
    c.add_argument("--in-process", action="store_true", help="run every implementation in this process instead of worker processes")
    c.add_argument("--timeout", type=_positive_seconds, default=600.0, help="seconds an implementation's worker may take per run (default 600)")
    c.add_argument("--max-memory", metavar="SIZE", help="memory the run may use, e.g. 20G (default: what the OS reports available); "
                   "implementations run side by side only when their estimated peaks fit, one after another otherwise, "
                   "and a run that cannot fit is refused before it starts")
    c.add_argument("--device-map", choices=["auto"], help="load hf through accelerate's device map: spread over GPUs, "
                   "CPU and disk offload for a model larger than memory (hooks still capture every layer)")
    from bughunt import probes

    for probe in probes.registered():  # each probe's own flags (bughunt/probes/)
        probe.add_arguments(c)
    c.set_defaults(func=cmd_compare)

def _add_sweep(command) -> None:
    """`bughunt sweep` and its flags."""
    from bughunt.implementations import DEVICES, DTYPES

    w = command("sweep", help="run one implementation under toggle settings; search for the ones that explain a divergence")
    w.add_argument("checkpoint")
    w.add_argument("--impl", default="hf", metavar="NAME[:DTYPE]", help="the candidate implementation (default hf)")
    w.add_argument("--reference", default=None, help="reference implementation (default reference:<dtype>, the reference emulating the dtype)")
    w.add_argument("--toggle", action="append", metavar="NAME[=VALUE]",
                   help="toggle to sweep (repeatable); in search mode a bare NAME tries its suggested values, none given = all")
    w.add_argument("--mode", default="one-at-a-time", choices=["one-at-a-time", "cumulative", "search"])
    w.add_argument("--side", default="reference", choices=["reference", "candidate"],
                   help="apply swept toggles to the reference (what does the candidate implement?) or to the candidate (which fix makes it match?)")
    w.add_argument("--candidate-toggle", action="append", metavar="NAME=VALUE", help="fixed toggle on the candidate (e.g. a planted bug)")
    w.add_argument("--reference-toggle", action="append", metavar="NAME=VALUE", help="fixed toggle on the reference")
    w.add_argument("--dtype", default="fp32", choices=DTYPES)
    w.add_argument("--device", default="cpu", choices=DEVICES)
    w.add_argument("--tokens")
    w.add_argument("--tokens-file")
    _add_text_options(w)
    w.add_argument("--out", type=_path)
    w.add_argument("--floor-factor", type=float, default=10.0)
    w.add_argument("--fail-on-finding", action="store_true", help="exit 1 when the candidate as is departs from the reference")
    w.set_defaults(func=cmd_sweep)

def _add_decode(command) -> None:
    """`bughunt decode` and its flags."""
    from bughunt.implementations import DEVICES, DTYPES

    k = command("decode", help="full forward pass vs incremental decoding (prefill, then one token at a time)")
    k.add_argument("checkpoint")
    k.add_argument("--impl", default="hf", metavar="NAME[:DTYPE][toggles]")
    k.add_argument("--reference", default=None, help="also compare each decoding step against this implementation")
    k.add_argument("--prefill", type=int, default=1, help="tokens processed in the first pass (default 1)")
    k.add_argument("--decode-config", action="append", metavar="KEY=VALUE",
                   help="config value changed for the one-token steps only (plants a decode-path bug)")
    k.add_argument("--dtype", default="fp32", choices=DTYPES)
    k.add_argument("--device", default="cpu", choices=DEVICES)
    k.add_argument("--tokens")
    k.add_argument("--tokens-file")
    _add_text_options(k)
    k.add_argument("--floor-factor", type=float, default=10.0)
    k.add_argument("--out", type=_path)
    k.add_argument("--fail-on-finding", action="store_true", help="exit 1 when a decoding step departs")
    k.set_defaults(func=cmd_decode)

def _add_demo(command) -> None:
    """`bughunt demo` and its flags."""
    d = command("demo", help="generate tiny checkpoints and compare every installed implementation on each")
    d.add_argument("--out", type=_path, default="reports/demo")
    d.add_argument("--family", action="append", help="limit to these families (repeatable)")
    d.set_defaults(func=cmd_demo)

def _add_tiny(command) -> None:
    """`bughunt tiny` and its flags."""
    t = command("tiny", help="write a tiny seeded checkpoint of a family")
    t.add_argument("family")
    t.add_argument("--out", type=_path, required=True)
    t.add_argument("--seed", type=_seed, default=0, help="seed of the weights (a non-negative integer, default 0)")
    t.add_argument("--trained", action="store_true", help="train the seeded model briefly on the shipped text (seconds on "
                   "CPU, deterministic: the same seed gives byte-identical weights), so loss on text means something")
    t.set_defaults(func=cmd_tiny)

def _add_envs(command) -> None:
    """`bughunt envs` and its flags."""
    e = command("envs", help="list, create or remove the library-version environments (hf==VERSION) in the user cache")
    e.add_argument("action", choices=["list", "create", "remove"])
    e.add_argument("names", nargs="*", metavar="NAME", help="create: IMPL==VERSION, e.g. hf==5.22.0; remove: a name from "
                   "`bughunt envs list`, or IMPL==VERSION")
    e.add_argument("--all", action="store_true", help="remove: every environment")
    e.set_defaults(func=cmd_envs)

def _add_render(command) -> None:
    """`bughunt render` and its flags."""
    r = command("render", help="re-render plots and report.html from a result.json")
    r.add_argument("result", help="result.json or the directory holding it")
    r.add_argument("--out", type=_path, help="where to write (default: beside result.json)")
    r.set_defaults(func=cmd_render)

def _add_lint(command) -> None:
    """`bughunt lint` and its flags."""
    lt = command("lint", help="static checks of a checkpoint's config, weights and tokenizer: exit 0 clean, 1 an error fired, 2 bad input")
    lt.add_argument("checkpoint", help="Hugging Face-format checkpoint directory")
    lt.add_argument("--json", type=_path, metavar="FILE", help="also write the versioned lint document to FILE")
    lt.add_argument("--tokenizers", action="store_true",
                    help="also encode a corpus of tricky strings with every available tokenizer implementation and report disagreements")
    lt.set_defaults(func=cmd_lint)

def _add_weights(command) -> None:
    """`bughunt weights` and its flags."""
    from bughunt.implementations import DEVICES, DTYPES

    wt = command("weights", help="compare every parameter an implementation loaded with the checkpoint: exit 0 all identical, "
                 "1 a parameter departs, 2 bad input")
    wt.add_argument("checkpoint", help="Hugging Face-format checkpoint directory")
    wt.add_argument("--impl", required=True, metavar="NAME[:DTYPE][@PYTHON]", help="the implementation whose loaded parameters "
                    "are checked: hf, keras-jax, keras-torch, deepmind")
    wt.add_argument("--dtype", default="fp32", choices=DTYPES, help="dtype to load at when --impl has no :DTYPE (default fp32); "
                    "the checkpoint rounded to it counts as identical")
    wt.add_argument("--device", default="cpu", choices=DEVICES)
    wt.add_argument("--json", type=_path, metavar="FILE", help="also write every parameter's relation to FILE (JSON)")
    wt.add_argument("--in-process", action="store_true", help="load in this process instead of a worker process")
    wt.add_argument("--timeout", type=_positive_seconds, default=600.0, help="seconds the worker may take (default 600)")
    wt.set_defaults(func=cmd_weights)

def _add_implementations(command) -> None:
    """`bughunt implementations` and its flags."""
    im = command("implementations", help="list every implementation: installed here or not, library versions, families, "
                 "dtypes, devices, toggles, and how to install a missing one")
    im.add_argument("--json", action="store_true", help="print the list as JSON")
    im.set_defaults(func=cmd_implementations)

def _add_ci(command, sub) -> None:
    """`bughunt ci` and its flags."""
    g = sub.add_parser("ci", help="run a TOML matrix of cells against stored baselines: exit 0 pass, 1 regression, 2 bad input",
                       usage="bughunt ci MATRIX --baseline DIR [--update-baseline] [--shard K/N] [--out DIR]\n"
                             "       bughunt ci merge DIR... [--out DIR]",
                       epilog=CI_MERGE_HELP + "\n\n" + EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("matrix", help="the matrix file (TOML; see examples/bughunt.toml); a file named merge is written ./merge")
    g.add_argument("--baseline", type=_path, required=True, metavar="DIR", help="directory of baseline JSON, one file per cell")
    g.add_argument("--update-baseline", action="store_true", help="record the baselines from this run (review and commit them)")
    g.add_argument("--shard", metavar="K/N", help="run only shard K of N (K from 1): whole checkpoint-device groups, about 1/N "
                   "of the cells; also writes shard.json for `bughunt ci merge`")
    g.add_argument("--out", type=_path, metavar="DIR", help="where to write junit.xml, summary.md, index.html and the reports (default reports/ci)")
    g.set_defaults(func=cmd_ci)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bughunt", description="Find numerics bugs in transformer implementations, layer by layer.",
                                epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        """A sub-command whose --help ends with the exit codes and the --out policy."""
        return sub.add_parser(name, epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    _add_compare(command)
    _add_sweep(command)
    _add_decode(command)
    _add_demo(command)
    _add_tiny(command)
    _add_envs(command)
    _add_render(command)
    _add_lint(command)
    _add_weights(command)
    _add_implementations(command)
    _add_ci(command, sub)
    return p


CI_MERGE_HELP = """\
sharding over a CI job matrix:
  bughunt ci MATRIX --baseline DIR --shard K/N --out shard-K   (one job per K = 1..N)
  bughunt ci merge shard-1 ... shard-N --out DIR               (one job after them)
  merge checks the directories are the N shards of one run and writes the summary.md, junit.xml and
  index.html (reports copied beside it) the unsharded run writes, and its exit code: 0 pass, 1 regression,
  2 bad input (shards of different matrices, missing or repeated shards, a malformed shard.json)."""


def build_ci_merge_parser() -> argparse.ArgumentParser:
    m = argparse.ArgumentParser(prog="bughunt ci merge", description="Combine the --out directories of the N shards of one "
                                "`bughunt ci MATRIX --shard K/N` run into one summary, JUnit file, HTML index and exit code "
                                "(0 pass, 1 regression, 2 bad input). A matrix file named merge is run as `bughunt ci ./merge`.",
                                epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("shards", nargs="+", metavar="DIR", help="each shard's --out directory (holding its shard.json), in any order")
    m.add_argument("--out", type=_path, metavar="DIR", help="where to write junit.xml, summary.md, index.html and the reports (default reports/ci)")
    m.set_defaults(func=cmd_ci_merge)
    return m


def quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    from bughunt.interrupt import Interrupted, handled

    quiet_libraries()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["ci", "merge"]:  # `bughunt ci merge DIR...`; a matrix file named merge is `bughunt ci ./merge`
        if "--baseline" in argv or "--shard" in argv:
            print("bughunt: error: `bughunt ci merge` combines shard directories and takes no --baseline or --shard. "
                  "To run a matrix file named merge, write `bughunt ci ./merge --baseline DIR`.", file=sys.stderr)
            return 2
        args = build_ci_merge_parser().parse_args(argv[2:])
    else:
        args = build_parser().parse_args(argv)
    try:
        with handled():
            return args.func(args)
    except BughuntError as e:
        print(f"bughunt: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"bughunt: interrupted by {e}: stopped the workers and removed temporary files; no half-written output remains.",
              file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # outside the main thread no handler is installed
        return 130


if __name__ == "__main__":
    sys.exit(main())
