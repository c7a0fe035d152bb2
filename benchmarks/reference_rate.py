"""How close the float64 reference runs to numpy's GEMM rate (issue 10): one forward pass of `reference_impls` on a
memory-mapped checkpoint, timed alone (best of --repeat passes), against a square float64 GEMM and a GEMM of the forward's own shape
([tokens, hidden] x [hidden, 4 hidden]) timed in the same run. Figures are printed, never asserted.

    python benchmarks/reference_rate.py CHECKPOINT --tokens 64 --tokens 512 --dtype fp64 --dtype bf16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: import this checkout's bughunt
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def gemm_gflops(m: int, k: int, n: int, reps: int = 3) -> float:
    """Best-of-`reps` float64 GEMM rate for [m, k] x [k, n]."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * m * k * n / best / 1e9


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--tokens", type=int, action="append", help="input length (repeatable; default 64 and 512)")
    ap.add_argument("--dtype", action="append", choices=["fp64", "fp32", "bf16", "fp16"], help="emulated dtype (repeatable; default fp64)")
    ap.add_argument("--repeat", type=int, default=3, help="forward passes timed per row, best kept, as for the GEMMs (default 3)")
    args = ap.parse_args()
    from bughunt.checkpoint import load_weights
    from bughunt.memory import matmul_parameters
    from bughunt.spec import load_spec
    from reference_impls import Policy, forward

    spec = load_spec(args.checkpoint)
    weights = load_weights(args.checkpoint, spec)
    params = matmul_parameters(spec)
    print(f"{args.checkpoint}: {params / 1e9:.3f}B parameters in matmuls; FLOPs per token = 2 x those (the embedding "
          "gather is free, the output projection is not)")
    print(f"{'tokens':>6} {'dtype':>5} {'forward':>9} {'GFLOP/s':>8} {'square GEMM':>12} {'same-shape GEMM':>16} {'of square':>9} {'of same-shape':>13}")
    for tokens in args.tokens or [64, 512]:
        ids = np.random.default_rng(0).integers(0, spec.vocab_size, (1, tokens))
        for dtype in args.dtype or ["fp64"]:
            square = gemm_gflops(2048, 2048, 2048)
            shaped = gemm_gflops(tokens, spec.hidden_size, spec.intermediate_size)
            seconds = min(_timed(lambda: forward(weights, spec, ids, Policy(dtype=dtype))) for _ in range(args.repeat))
            rate = 2 * params * tokens / seconds / 1e9
            print(f"{tokens:>6} {dtype:>5} {seconds:>8.2f}s {rate:>8.1f} {square:>12.1f} {shaped:>16.1f} {rate / square:>9.0%} {rate / shaped:>13.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
