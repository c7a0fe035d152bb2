"""The baseline benchmarks/scale.py measures bughunt against: transformers alone loads the checkpoint
(`AutoModelForCausalLM.from_pretrained`, eager attention) and runs one forward pass on the given token ids.
Prints one JSON line: load and forward seconds, and whether the logits are finite.

    python benchmarks/bare_forward.py CHECKPOINT --dtype bf16 --tokens 1,2,3
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--tokens", required=True, help="comma-separated token ids (one sequence)")
    args = ap.parse_args()
    import torch
    import transformers

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    ids = torch.tensor([[int(t) for t in args.tokens.split(",")]], dtype=torch.long)
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, attn_implementation="eager")
    model.eval()
    t1 = time.perf_counter()
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    t2 = time.perf_counter()
    print(json.dumps({"load_s": t1 - t0, "forward_s": t2 - t1, "logits_finite": bool(torch.isfinite(logits).all()),
                      "tokens": ids.shape[1], "dtype": args.dtype, "transformers": transformers.__version__,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
