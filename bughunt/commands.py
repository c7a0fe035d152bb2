"""What each `bughunt` sub-command does with its parsed flags: call the Python API, print the terminal summary, return
the exit code (0, or 1 when --fail-on-finding fired). bughunt/cli.py builds the parser and maps errors to exit 2."""

from __future__ import annotations

import sys
from pathlib import Path

from bughunt.sources import short_name
from bughunt.errors import BughuntError
from bughunt.summary import format_summary


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
    out = Path(args.out) if args.out else Path("reports") / f"{short_name(args.checkpoint)}-{args.dtype}"
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
    out = Path(args.out) if args.out else Path("reports") / f"{short_name(args.checkpoint)}-sweep-{args.mode}"
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
    out = Path(args.out) if args.out else Path("reports") / f"{short_name(args.checkpoint)}-decode"
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
    if args.original is not None:
        from bughunt.gguf_original import relate_arguments

        wc = relate_arguments(args.checkpoint, args.original)
    elif args.impl is None:
        raise BughuntError("bughunt weights needs --impl NAME (the implementation whose loaded parameters are checked), "
                           "or --original DIR|HUB_ID with a GGUF checkpoint.")
    else:
        wc = check(args.checkpoint, args.impl, dtype=args.dtype, device=args.device, in_process=args.in_process,
                   timeout=args.timeout)
    print(format_check(wc))
    if args.json:
        write_json(wc, Path(args.json), protect)
        print(f"wrote {args.json}")
    return 1 if wc.departures else 0
