"""Benchmark: wall time of the HF forward pass with bughunt's capture hooks against without them, as a ratio
measured in one run (interleaved repetitions, median). Not a test: it prints figures.

    python benchmarks/capture_overhead.py [--family llama] [--tokens 256] [--reps 20] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from bughunt.implementations.hf import HFRunner
from bughunt.spec import load_spec
from bughunt.tiny import tiny_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="llama")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--no-branches", action="store_true")
    args = ap.parse_args()
    ck = tiny_checkpoint(args.family)
    spec = load_spec(ck)
    tokens = np.random.default_rng(0).integers(3, spec.vocab_size, size=(1, args.tokens))
    with HFRunner(ck, spec, args.dtype, branches=not args.no_branches) as runner:
        runner.forward_plain(tokens), runner.run(tokens)  # warm up
        plain, captured = [], []
        for _ in range(args.reps):
            t = time.perf_counter(); runner.forward_plain(tokens); plain.append(time.perf_counter() - t)  # noqa: E702
            t = time.perf_counter(); runner.run(tokens); captured.append(time.perf_counter() - t)  # noqa: E702
    p, c = statistics.median(plain), statistics.median(captured)
    print(f"family={args.family} dtype={args.dtype} tokens={args.tokens} reps={args.reps} branches={not args.no_branches}")
    print(f"forward without capture: median {p * 1e3:.2f} ms")
    print(f"forward with capture:    median {c * 1e3:.2f} ms (hooks + copy of every capture point to numpy)")
    print(f"ratio with/without: {c / p:.2f}x")


if __name__ == "__main__":
    main()
