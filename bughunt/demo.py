"""`bughunt demo`, the built-in main job: tiny seeded checkpoints of every family, trained for a few seconds on the
shipped text (`bughunt tiny --trained`) and fed the shipped default prompt, each compared across every installed
implementation (fp32 and bf16) against the float64 reference, plus one planted bug found by a toggle search, written
to reports/demo/."""

from __future__ import annotations

import time
from pathlib import Path

from bughunt.comparison import compare
from bughunt.implementations import REGISTRY, available, supports
from bughunt.report import render_template
from bughunt.result import write_atomically
from bughunt.summary import format_summary
from bughunt.text import default_request
from bughunt.tiny import TINY_FAMILIES, tiny_checkpoint


# keras-hub's bf16 lines show only bf16 rounding on these models; fp32 is where its findings are. Keeps the demo
# within a minute on 2 cores.
DEMO_DTYPES = {"keras-jax": ("fp32",), "keras-torch": ("fp32",), "hf+sdpa": ("fp32",), "hf+flex": ("fp32",),
               "hf+compile": ("fp32",), "mlx": ("fp32",),
               "llamacpp": ("fp32",)}
# flex attention and torch.compile compile each model on first use (tens of seconds to minutes per family on 2
# cores): the demo shows each on one family.
DEMO_FAMILIES = {"hf+flex": ("qwen3",), "hf+compile": ("qwen3",)}


def run_demo(out: Path, families: list[str] | None = None) -> list:
    t0 = time.perf_counter()
    impls = [name for name in REGISTRY if name != "reference" and available(name)]
    results = []

    def write(tmp: Path) -> None:
        rows = []
        if "llamacpp" in impls:  # every family's GGUF in one converter process (a failure shows in its family's row)
            from bughunt.errors import BughuntError
            from bughunt.implementations.gguf_convert import convert_many

            try:
                convert_many([(tiny_checkpoint(f), "fp32") for f in families or TINY_FAMILIES])
            except BughuntError:
                pass
        for family in families or TINY_FAMILIES:
            checkpoint = tiny_checkpoint(family, trained=True)
            choices = [f"{name}:{dt}" for name in impls if supports(name, family) and family in DEMO_FAMILIES.get(name, (family,))
                       for dt in DEMO_DTYPES.get(name, ("fp32", "bf16"))]
            result = compare(checkpoint, choices + ["reference"], reference="reference", out=tmp / family, pool=pool,
                             text=default_request())
            results.append(result)
            print(format_summary(result), flush=True)
            for c in result.comparisons:
                rows.append((family, c["candidate"], c["first_above_floor"] or "none", c["summary"]["max_rel_l2"]))
            for e in result.data["implementations"]:
                if e["status"] != "ok":
                    rows.append((family, e["label"], "FAILED", None))
        if "gemma2" in (families or TINY_FAMILIES):
            # A planted bug, found by name: HF gemma2 run with exact GELU (the Gemma 1 config mistake) against a
            # reference that knows nothing about it; the search names the toggle and its ablation.
            from bughunt.sweep import sweep

            planted = sweep(tiny_checkpoint("gemma2", trained=True), impl="hf", mode="search", candidate_toggles={"gelu": "exact"},
                            out=tmp / "planted-gemma2-gelu", text=default_request())
            print(f"planted bug (hf gemma2 with gelu=exact): {planted.data['diagnosis']}", flush=True)
            rows.append(("planted-gemma2-gelu", "hf{gelu=exact} search", planted.data["diagnosis"], None))
        (tmp / "index.html").write_text(render_template("demo_index.html", rows=rows))

    from bughunt.worker import WorkerPool

    with WorkerPool() as pool:  # one worker per implementation serves every family: libraries load once
        write_atomically(out, write, kind="demo")
    print(f"demo: {len(results)} families, implementations {', '.join(impls + ['reference'])}, "
          f"{time.perf_counter() - t0:.1f}s; open {out}/index.html")
    return results
