"""The `bughunt` command line: a thin layer over the Python API. User errors print one message and exit 2."""

from __future__ import annotations

import argparse
import os
import sys

from bughunt.errors import BughuntError
from bughunt.commands import (cmd_ci, cmd_ci_merge, cmd_compare, cmd_decode, cmd_demo, cmd_envs, cmd_implementations,
                              cmd_lint, cmd_render, cmd_sweep, cmd_tiny, cmd_weights)

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


CHECKPOINT_HELP = ("the checkpoint: a Hugging Face-format directory (config.json + *.safetensors), a GGUF file (read as a "
                   "dequantized view; llamacpp runs the file itself), or a hub id org/name[@revision]")

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


def _add_compare(command) -> None:
    """`bughunt compare` and its flags."""
    from bughunt.implementations import DEVICES, DTYPES
    from bughunt.implementations.catalog import impl_help

    c = command("compare", help="compare implementations of one checkpoint against a reference")
    c.add_argument("checkpoint", help=CHECKPOINT_HELP)
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
    w.add_argument("checkpoint", help=CHECKPOINT_HELP)
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
    k.add_argument("checkpoint", help=CHECKPOINT_HELP)
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
    lt.add_argument("checkpoint", help=CHECKPOINT_HELP)
    lt.add_argument("--json", type=_path, metavar="FILE", help="also write the versioned lint document to FILE")
    lt.add_argument("--tokenizers", action="store_true",
                    help="also encode a corpus of tricky strings with every available tokenizer implementation and report disagreements")
    lt.set_defaults(func=cmd_lint)

def _add_weights(command) -> None:
    """`bughunt weights` and its flags."""
    from bughunt.implementations import DEVICES, DTYPES

    wt = command("weights", help="compare every parameter an implementation loaded with the checkpoint: exit 0 all identical, "
                 "1 a parameter departs, 2 bad input")
    wt.add_argument("checkpoint", help=CHECKPOINT_HELP)
    wt.add_argument("--impl", metavar="NAME[:DTYPE][@PYTHON]", help="the implementation whose loaded parameters "
                    "are checked: hf, keras-jax, keras-torch, deepmind, llamacpp (required unless --original)")
    wt.add_argument("--original", metavar="DIR|HUB_ID", help="with a GGUF checkpoint: the checkpoint it was made from; "
                    "every GGUF tensor is related to the original's (quantized within its type's bound, or what else)")
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
