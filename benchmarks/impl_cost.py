"""Benchmark: what each implementation costs on first use and when warm, as multiples of the plain `hf` forward.

Each implementation runs in a fresh process (its own library imports, and for hf+flex / hf+compile an empty
Inductor cache, so the first run pays the whole compile): `open` (load or convert the checkpoint), the first
captured forward (where flex attention and torch.compile compile), then the median of warm captured forwards.
Not a test: it prints a table (and writes JSON with --json); nothing is asserted.

    python benchmarks/impl_cost.py                                  # tiny llama, fp32, every installed implementation
    python benchmarks/impl_cost.py --shape llama-1b --dtype bf16    # the 1B-shaped checkpoint (benchmarks/shapes.py)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMPLS = ("hf", "hf+sdpa", "hf+flex", "hf+compile", "mlx")


def child(impl: str, checkpoint: str, dtype: str, tokens: int, reps: int, beside_hf: bool = False) -> dict:
    """Runs in the measured process: open, first forward, warm forwards; returns seconds. With `beside_hf`, a plain
    `hf` runner of the same checkpoint is opened after the measured ones and its warm forwards are interleaved with
    the implementation's, so their ratio is taken under the same load (a shared machine's load moves by the minute)."""
    import numpy as np

    from bughunt.implementations import runner_class
    from bughunt.spec import load_spec

    t0 = time.perf_counter()
    spec = load_spec(Path(checkpoint))
    cls = runner_class(impl)
    ids = np.random.default_rng(0).integers(3, min(spec.vocab_size, 32000), size=(1, tokens))
    runner = cls(Path(checkpoint), spec, dtype, "cpu", branches=True)
    imported = time.perf_counter()
    runner.open()
    opened = time.perf_counter()
    runner.run(ids)
    first = time.perf_counter()
    warm, hf_warm = [], []
    hf = runner_class("hf")(Path(checkpoint), spec, dtype, "cpu", branches=True).open() if beside_hf else None
    if hf is not None:
        hf.run(ids)
    for _ in range(reps):
        t = time.perf_counter()
        runner.run(ids)
        warm.append(time.perf_counter() - t)
        if hf is not None:
            t = time.perf_counter()
            hf.run(ids)
            hf_warm.append(time.perf_counter() - t)
    runner.close()
    out = {"import_s": imported - t0, "open_s": opened - imported, "first_forward_s": first - opened,
           "warm_forward_s": statistics.median(warm)}
    if hf is not None:
        hf.close()
        out["hf_warm_forward_s"] = statistics.median(hf_warm)
        out["warm_vs_hf_same_process"] = out["warm_forward_s"] / out["hf_warm_forward_s"]
    return out


def measure(impl: str, checkpoint: Path, dtype: str, tokens: int, reps: int, timeout: float, beside_hf: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="bughunt-impl-cost-") as inductor:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        t = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, __file__, "--child", impl, str(checkpoint), dtype, str(tokens), str(reps)]
                                  + (["beside-hf"] if beside_hf else []),
                                  capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:g} s"}
        wall = time.perf_counter() - t
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["exit code %d" % done.returncode])[-1][:200]}
    return {**json.loads(lines[-1]), "process_wall_s": wall}


def table(rows: dict[str, dict], label: str) -> str:
    base = rows.get("hf", {}).get("warm_forward_s")
    same = all("hf_warm_forward_s" in r for r in rows.values() if "error" not in r)
    out = [f"{label}: multiples of the warm plain hf forward "
           + ("timed in the same process, interleaved (--beside-hf)" if same else f"({base * 1e3:.1f} ms)" if base else ""),
           f"  {'implementation':<12} {'open s':>8} {'first fwd s':>12} {'warm fwd s':>11} {'open x':>8} {'first x':>9} "
           f"{'warm x':>8} {'process s':>10} {'warm / hf, same process':>24}"]
    for impl, r in rows.items():
        if "error" in r:
            out.append(f"  {impl:<12} FAILED: {r['error']}")
            continue
        b = r["hf_warm_forward_s"] if same else base
        x = (lambda v, b=b: f"{v / b:.1f}x") if b else (lambda v: "–")
        out.append(f"  {impl:<12} {r['open_s']:>8.2f} {r['first_forward_s']:>12.2f} {r['warm_forward_s']:>11.3f} "
                   f"{x(r['open_s']):>8} {x(r['first_forward_s']):>9} {x(r['warm_forward_s']):>8} {r['process_wall_s']:>10.1f}"
                   + (f" {r['warm_vs_hf_same_process']:>23.2f}x" if "warm_vs_hf_same_process" in r else ""))
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        impl, checkpoint, dtype, tokens, reps = sys.argv[2:7]
        print(json.dumps(child(impl, checkpoint, dtype, int(tokens), int(reps), sys.argv[7:8] == ["beside-hf"])), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="llama", help="tiny family (default llama), when no --shape is given")
    ap.add_argument("--shape", help="a real shape from benchmarks/shapes.py, e.g. llama-1b (reused from the cache)")
    ap.add_argument("--impl", action="append", help=f"implementation (repeatable; default the installed of {', '.join(DEFAULT_IMPLS)})")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3, help="warm forwards (median)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per implementation")
    ap.add_argument("--beside-hf", action="store_true", help="also time plain hf's warm forward in each measured process, "
                    "interleaved, and report the ratio taken under the same load (memory: two models at once)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    from bughunt.implementations import available

    if args.shape:
        from benchmarks.scale import default_dir
        from benchmarks.shapes import SHAPES, ensure_checkpoint

        checkpoint, label = ensure_checkpoint(SHAPES[args.shape], default_dir()).path, args.shape
    else:
        from bughunt.tiny import tiny_checkpoint

        checkpoint, label = tiny_checkpoint(args.family), f"tiny {args.family}"
    impls = args.impl or [i for i in DEFAULT_IMPLS if available(i)]
    if "hf" not in impls:
        impls = ["hf", *impls]
    rows = {}
    for impl in impls:
        rows[impl] = measure(impl, checkpoint, args.dtype, args.tokens, args.reps, args.timeout, args.beside_hf)
        print(f"{impl}: {rows[impl]}", file=sys.stderr, flush=True)
    print(table(rows, f"{label}, {args.dtype}, {args.tokens} tokens, {args.reps} warm forwards"))
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": str(checkpoint), "dtype": args.dtype, "tokens": args.tokens,
                                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
