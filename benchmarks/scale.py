"""Benchmark for real sizes (issue 10): writes real-shaped checkpoints with random weights, then for each shape
measures, as separate process trees (peak RSS over every process, workers included, and wall time):

  bare     transformers alone: from_pretrained + one forward (benchmarks/bare_forward.py), the baseline;
  compare  `bughunt compare CKPT --impl hf --impl reference --dtype DTYPE`, as a multiple of bare, and the
           reference's achieved GFLOP/s (float64 pass, and the emulated-dtype pass when result.json records it)
           against numpy's float64 GEMM rate measured in this run;
  sweep    `bughunt sweep CKPT --impl hf --mode search --candidate-toggle BUG`: a reference-side search on a
           candidate with a planted bug, as a multiple of one compare.

Figures are printed (and written with --json), never asserted. A guard kills any measured process tree whose RSS
passes --max-rss-gb, or when the machine's available memory falls below --min-available-gb, and the row says so.

    python benchmarks/scale.py --shape small                          # every measurement on the smoke-test shape
    python benchmarks/scale.py --shape llama-1b --only bare --json b.json
    python benchmarks/scale.py --shape llama-1b --shape gemma-2b --shape llama-8b --json scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: import this checkout's bughunt and benchmarks
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.proctree import GB, Measurement, measure  # noqa: E402
from benchmarks.shapes import SHAPES, CheckpointInfo, ensure_checkpoint, forward_flops  # noqa: E402
from bughunt.errors import BughuntError  # noqa: E402
from bughunt.spec import Spec  # noqa: E402

MEASUREMENTS = ("write", "bare", "compare", "sweep")
PLANTED_BUGS = (("rope_theta", "10000"), ("gelu", "exact"))  # the first one that changes the family's numerics


def default_dir() -> Path:
    """Checkpoints live in the user cache (never in the repository): BUGHUNT_CACHE/scale if set."""
    from bughunt.tiny import cache_dir

    return cache_dir() / "scale"


def gemm_gflops(n: int = 2048, reps: int = 5) -> float:
    """numpy float64 GEMM rate on n x n matrices, best of `reps` (the reference's matmul ceiling here)."""
    a = np.random.default_rng(0).standard_normal((n, n))
    b = np.random.default_rng(1).standard_normal((n, n))
    a @ b  # warm up BLAS threads
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def planted_bug(spec: Spec) -> str:
    """A toggle value that plants a bug in the candidate for this family: RoPE theta 10000 where the config says
    otherwise, exact GELU for a tanh-GELU family."""
    from bughunt.toggles import TOGGLES, changed

    for name, value in PLANTED_BUGS:
        toggle = TOGGLES[name]
        if toggle.applies(spec) and changed(spec, {name: toggle.parse(value, spec)}):
            return f"{name}={value}"
    raise BughuntError(f"no planted bug in {PLANTED_BUGS} changes family {spec.family}; pass --planted-bug NAME=VALUE.")


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def _guarded(command: list[str], args) -> Measurement:
    shown = [f"<{c.count(',') + 1} ids>" if prev == "--tokens" else c for prev, c in zip(["", *command], command)]
    print(f"  $ {' '.join(shown)}", file=sys.stderr, flush=True)
    return measure(command, env=child_env(), cwd=ROOT, max_rss_gb=args.max_rss_gb, min_available_gb=args.min_available_gb,
                   timeout_s=args.timeout_s)


def _figures(m: Measurement) -> dict:
    d = m.to_dict()
    d.pop("stdout")
    if m.ok:
        d.pop("stderr_tail")
    d["peak_rss_gb"], d["peak_anon_gb"] = m.peak_rss_bytes / GB, m.peak_anon_bytes / GB
    return d


def measure_bare(ckpt: Path, ids: str, args) -> dict:
    m = _guarded([sys.executable, str(ROOT / "benchmarks" / "bare_forward.py"), str(ckpt), "--dtype", args.dtype,
                  "--tokens", ids], args)
    out = _figures(m)
    if m.ok:
        out["inside"] = json.loads(m.stdout.strip().splitlines()[-1])
    return out


def _rate(seconds: float | None, flops: int, gemm: float) -> dict | None:
    if not seconds:
        return None
    rate = flops / seconds / 1e9
    return {"forward_s": seconds, "gflops": rate, "fraction_of_gemm": rate / gemm}


def reference_rates(result: dict, spec: Spec, batch: int, seq: int, gemm: float) -> dict:
    """The reference's achieved GFLOP/s and fraction of the GEMM rate, from result.json: the float64 pass from the
    reference implementation's trace timings (`forward_s`), the emulated-dtype pass from
    noise_floor[dtype].timings.emulated_forward_s (None when not recorded). When the passes ran side by side in
    one read of the model (timings.together_with > 1), each pass's forward_s is its own time, with each shared weight's
    conversion charged to the float64 pass (it converts first); `together` records the joint rate: every pass's
    FLOPs over the joint seconds."""
    flops = forward_flops(spec, batch, seq)["total"]
    out: dict = {"forward_gflop": flops / 1e9, "gemm_gflops": gemm, "fp64": None, "emulated": None, "together": None}
    entries = result.get("implementations", [])
    ref = next((e for e in entries if e.get("name") == "reference" and e.get("dtype") == "fp64" and e.get("status") == "ok"), None)
    timings = ((ref or {}).get("meta") or {}).get("timings") or {}
    if timings:
        out["fp64"] = {**(_rate(timings.get("forward_s"), flops, gemm) or {}), "load_s": timings.get("load_s")}
        passes = int(timings.get("together_with") or 1)
        if passes > 1 and timings.get("together_s"):
            out["together"] = {"passes": passes, "seconds": timings["together_s"],
                               **(_rate(timings["together_s"] / passes, flops, gemm) or {})}
    floor = next(iter(result.get("noise_floor", {}).values()), {})
    out["emulated"] = _rate((floor.get("timings") or {}).get("emulated_forward_s"), flops, gemm)
    hf = next((e for e in entries if e.get("name") == "hf" and e.get("status") == "ok"), None)
    if hf:
        out["hf_timings"] = hf["meta"].get("timings")
    return out


def measure_compare(ckpt: Path, spec: Spec, ids: str, args, gemm: float, outputs: Path) -> dict:
    out_dir = outputs / "compare"
    m = _guarded([sys.executable, "-m", "bughunt.cli", "compare", str(ckpt), "--impl", "hf", "--impl", "reference",
                  "--dtype", args.dtype, "--tokens", ids, "--out", str(out_dir)], args)
    out = _figures(m)
    if m.ok:
        result = json.loads((out_dir / "result.json").read_text())
        out["reference"] = reference_rates(result, spec, 1, args.tokens, gemm)
        out["first_above_floor"] = {c["candidate"]: c["first_above_floor"] for c in result.get("comparisons", [])}
    return out


def measure_sweep(ckpt: Path, spec: Spec, ids: str, args, outputs: Path) -> dict:
    bug = args.planted_bug or planted_bug(spec)
    out_dir = outputs / "sweep"
    m = _guarded([sys.executable, "-m", "bughunt.cli", "sweep", str(ckpt), "--impl", "hf", "--dtype", args.dtype,
                  "--mode", "search", "--candidate-toggle", bug, "--tokens", ids, "--out", str(out_dir)], args)
    out = {**_figures(m), "planted_bug": bug}
    if m.ok:
        search = json.loads((out_dir / "result.json").read_text())["sweep"].get("search") or {}
        out.update({k: search.get(k) for k in ("method", "evaluated", "space_size", "diagnosis")})
    return out


# -- the table ------------------------------------------------------------------------------------------------
def _gb(d: dict) -> str:
    return f"{d['peak_rss_gb']:.2f} GB"


def _load(d: dict) -> str:
    start, end = d["load_average"]
    return f"; load {start:.1f}->{end:.1f}"


def _show_rate(r: dict | None) -> str:
    if not r or "gflops" not in r:
        return "n/a"
    return f"{r['forward_s']:.2f} s = {r['gflops']:.1f} GFLOP/s = {100 * r['fraction_of_gemm']:.0f}% of GEMM"


def table_rows(shape: str, figures: dict) -> list[tuple[str, ...]]:
    """(shape, measurement, status, peak RSS, wall, vs baseline, detail) rows for one shape."""
    rows = []
    w = figures.get("write")
    if w:
        rows.append((shape, "checkpoint", w["status"], "", f"{w['seconds']:.1f} s", "",
                     f"{w['parameters'] / 1e9:.3f}B params, {w['bytes'] / 1e9:.2f} GB in {w['shards']} shard(s)"))
    bare, cmp_, sw = figures.get("bare"), figures.get("compare"), figures.get("sweep")
    if bare:
        inside = bare.get("inside") or {}
        detail = f"load {inside['load_s']:.1f} s, forward {inside['forward_s']:.2f} s" if inside else bare.get("stderr_tail", "")[-80:]
        rows.append((shape, "bare HF forward", bare["message"], _gb(bare), f"{bare['wall_s']:.1f} s", "", detail + _load(bare)))
    if cmp_:
        ratio = ""
        if bare and bare["status"] == "ok" and cmp_["status"] == "ok":
            ratio = f"{cmp_['peak_rss_bytes'] / bare['peak_rss_bytes']:.2f}x RSS, {cmp_['wall_s'] / bare['wall_s']:.2f}x time"
        ref = cmp_.get("reference") or {}
        hf = ref.get("hf_timings") or {}
        detail = f"hf forward {hf['forward_s']:.2f} s" if hf else cmp_.get("stderr_tail", "")[-80:]
        rows.append((shape, "compare hf+reference", cmp_["message"], _gb(cmp_), f"{cmp_['wall_s']:.1f} s", ratio, detail + _load(cmp_)))
        if ref:
            together = ref.get("together")
            share = " (its own steps; the shared weight conversion is charged to the fp64 pass)" if together else ""
            rows.append((shape, "  reference fp64 pass", "", "", "", "", _show_rate(ref.get("fp64")) + share))
            rows.append((shape, "  reference emulated", "", "", "", "", _show_rate(ref.get("emulated")) + share))
            if together:
                rows.append((shape, "  reference joint", "", "", "", "",
                             f"{together['passes']} passes side by side in {together['seconds']:.2f} s: " + _show_rate(together)))
    if sw:
        ratio = f"{sw['wall_s'] / cmp_['wall_s']:.2f}x compare" if cmp_ and cmp_["status"] == "ok" and sw["status"] == "ok" else ""
        detail = (f"[{sw['planted_bug']}] {sw.get('evaluated')} of {sw.get('space_size')} settings ({sw.get('method')}): "
                  f"{sw.get('diagnosis')}" if sw["status"] == "ok" else f"[{sw['planted_bug']}] " + sw.get("stderr_tail", "")[-80:])
        rows.append((shape, "sweep search", sw["message"], _gb(sw), f"{sw['wall_s']:.1f} s", ratio, detail + _load(sw)))
    return rows


def format_table(rows: list[tuple[str, ...]]) -> str:
    head = ("shape", "measurement", "status", "peak RSS", "wall", "vs baseline", "detail")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    lines = []
    for r in [head, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return "\n".join(lines)


# -- the run --------------------------------------------------------------------------------------------------
def run_shape(name: str, args, gemm: float, outputs: Path) -> dict:
    from bughunt.plan import default_tokens

    shape = SHAPES[name]
    print(f"[{name}] {shape.description}", file=sys.stderr, flush=True)
    info: CheckpointInfo = ensure_checkpoint(shape, args.dir, args.seed)
    figures: dict = {"write": {"status": info.status, "seconds": info.seconds, "path": str(info.path), "bytes": info.bytes,
                               "parameters": info.parameters, "shards": info.shards}}
    print(f"  checkpoint {info.status} in {info.seconds:.1f} s: {info.path}", file=sys.stderr, flush=True)
    spec = shape.spec
    ids = ",".join(str(int(t)) for t in default_tokens(spec, args.tokens)[0])
    figures["tokens"] = args.tokens
    figures["flops"] = forward_flops(spec, 1, args.tokens)
    if "bare" in args.only:
        figures["bare"] = measure_bare(info.path, ids, args)
    if "compare" in args.only:
        figures["compare"] = measure_compare(info.path, spec, ids, args, gemm, outputs / name)
    if "sweep" in args.only:
        figures["sweep"] = measure_sweep(info.path, spec, ids, args, outputs / name)
    return figures


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", choices=list(SHAPES), help="shape to measure (repeatable; default small)")
    ap.add_argument("--dir", type=Path, default=None, help="where checkpoints are written and reused (default: user cache/scale)")
    ap.add_argument("--tokens", type=int, default=64, help="input length (default 64)")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--only", action="append", choices=MEASUREMENTS,
                    help="run only these measurements (repeatable; the checkpoint is always written); default all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--planted-bug", metavar="NAME=VALUE", help="candidate toggle for the sweep (default per family: "
                    + ", else ".join(f"{n}={v}" for n, v in PLANTED_BUGS) + ")")
    ap.add_argument("--max-rss-gb", type=float, default=22.0, help="kill a measured process tree above this RSS (default 22)")
    ap.add_argument("--min-available-gb", type=float, default=0.5,
                    help="kill a measured process tree when the machine's available memory falls below this (default 0.5)")
    ap.add_argument("--timeout-s", type=float, default=3600.0, help="kill a measured command after this long (default 3600)")
    ap.add_argument("--keep", type=Path, metavar="DIR", help="keep each compare/sweep output (report.html) under DIR/<shape>/")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write every figure to FILE")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.shape = list(dict.fromkeys(args.shape or ["small"]))
    args.only = set(args.only or MEASUREMENTS)
    args.dir = args.dir or default_dir()
    try:
        if args.tokens < 1:
            raise BughuntError(f"--tokens must be at least 1, got {args.tokens}.")
        if args.dir.exists() and not args.dir.is_dir():
            raise BughuntError(f"--dir {args.dir} is a file; pass a directory for the checkpoints (it is created if missing).")
        if args.dir.resolve().is_relative_to(ROOT):
            raise BughuntError(f"--dir {args.dir} lies inside the repository; checkpoints of gigabytes belong elsewhere "
                               "(the default is the user cache).")
        if args.json and not args.json.parent.is_dir():
            raise BughuntError(f"--json {args.json}: directory {args.json.parent} does not exist. Create it or write elsewhere.")
        if args.planted_bug:
            from bughunt.toggles import parse_toggles

            parse_toggles([args.planted_bug])  # a known toggle and a valid value, or one clear message
        gemm = gemm_gflops()
        print(f"numpy float64 GEMM (2048^3, best of 5): {gemm:.1f} GFLOP/s", file=sys.stderr, flush=True)
        report = {"schema": "bughunt.benchmark.scale", "version": 1,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                  "machine": {"cpus": os.cpu_count(), "memory_gb": _memory_gb(), "gemm_fp64_gflops": gemm,
                              "load_average_1m": os.getloadavg()[0]},
                  "settings": {"tokens": args.tokens, "dtype": args.dtype, "seed": args.seed, "dir": str(args.dir),
                               "max_rss_gb": args.max_rss_gb, "min_available_gb": args.min_available_gb},
                  "shapes": {}}
        rows = []
        with tempfile.TemporaryDirectory(prefix="bughunt-scale-") as scratch:
            outputs = args.keep or Path(scratch)
            for name in args.shape:
                report["shapes"][name] = run_shape(name, args, gemm, outputs)
                rows += table_rows(name, report["shapes"][name])
    except BughuntError as e:
        print(f"scale.py: error: {e}", file=sys.stderr)
        return 2
    print(f"numpy float64 GEMM: {gemm:.1f} GFLOP/s; {args.tokens} tokens at {args.dtype}; peak RSS summed over each process tree; "
          f"load average {report['machine']['load_average_1m']:.1f} on {os.cpu_count()} CPUs at the start")
    print(format_table(rows))
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(args.json)
        print(f"wrote {args.json}")
    return 0


def _memory_gb() -> float:
    import psutil

    return psutil.virtual_memory().total / GB


if __name__ == "__main__":
    sys.exit(main())
