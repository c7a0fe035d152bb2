"""`bughunt demo`, the built-in main job, written to reports/demo/. It opens with the real trained model bughunt ships
(SmolLM2-135M-Instruct, a Q4_1 GGUF file: bughunt.sources.real_model): every installed implementation of its
architecture at fp32 and bf16 (llama.cpp runs the file itself, at its own type) on the first paragraphs of the shipped
text, with the loss on that text, greedy generation, and for each implementation that departs the reference-side toggle
search's named cause. Then tiny seeded checkpoints of every family, trained for a few seconds on the shipped text and
fed its default prompt, through every installed implementation; and one planted bug found by a search. index.html is a
matrix of checkpoints by implementations, each run coloured by its largest multiple of the noise floor."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from bughunt.comparison import compare
from bughunt.implementations import REGISTRY, available, supports
from bughunt.report import render_template
from bughunt.result import Result, write_atomically
from bughunt.summary import format_summary
from bughunt.text import DEFAULT_TEXT_FILE, TextRequest, default_request
from bughunt.tiny import TINY_FAMILIES, tiny_checkpoint

REAL = "smollm2"  # the real model's name among the demo's families (--family smollm2)
REAL_TITLE = "SmolLM2-135M-Instruct (Q4_1 GGUF)"
# The real model reads the first paragraphs of the shipped text: 263 tokens through its own tokenizer (its default
# prompt alone is 18).
REAL_TEXT = DEFAULT_TEXT_FILE.parent / "tiny_corpus.txt"
REAL_PARAGRAPHS = 4
REAL_GENERATE = 4  # greedy steps; the float64 reference recomputes the whole prefix for each (a full pass apiece)
# Left out of the demo, with why (measured on this 2-core machine, the real model at 263 tokens; they run in `bughunt
# compare`, and the tests run them): the index page says so.
LEFT_OUT = {
    "hf+compile": "torch.compile compiles the model, and again for each new length while generating: over 6 CPU minutes "
                  "on the real model, unfinished",
    "hf+flex": "flex attention compiles its kernels: 40 CPU seconds on the real model, and on the tiny models it agrees "
               "with hf within the floor",
}
# Left out of the real model's row only.
REAL_LEFT_OUT = {"mlx": "mlx's Linux CPU backend takes 30 CPU seconds for one fp32 pass of it (over 4 CPU minutes with bf16 "
                        "and generation); the tiny models' rows show mlx"}
# The tiny models run at fp32 only: at bf16 every implementation sits at its floor on them (at most 1.3x), and the real
# model shows bf16.
TINY_DTYPES = ("fp32",)


@dataclass
class Row:
    """One checkpoint of the demo: its compare, where its report is, and the causes searches named (label -> search)."""

    name: str
    title: str
    result: Result
    causes: dict[str, dict] = field(default_factory=dict)


def run_demo(out: Path, families: list[str] | None = None, implementations: list[str] | None = None) -> list[Result]:
    """Run the demo into `out`: the real model (REAL) and the tiny families, or those of `families`; every installed
    implementation but the reference, or those of `implementations`. Returns the compares' Results in order."""
    from bughunt.worker import WorkerPool

    t0 = time.perf_counter()
    names = list(families or [REAL, *TINY_FAMILIES])
    names.sort(key=lambda n: n != REAL)  # the real model leads
    impls = [n for n in REGISTRY if n != "reference" and available(n) and
             (n in implementations if implementations is not None else n not in LEFT_OUT)]
    real_impls = impls if implementations is not None else [n for n in impls if n not in REAL_LEFT_OUT]
    rows: list[Row] = []
    timings: list[tuple[str, float]] = []

    def write(tmp: Path) -> None:
        for name in names:
            start = time.perf_counter()
            rows.append(_real_row(tmp, real_impls, pool, timings) if name == REAL else _tiny_row(tmp, name, impls, pool))
            print(format_summary(rows[-1].result), flush=True)
            timings.append((f"{name}: compare" + (" (and the searches)" if name == REAL else ""), time.perf_counter() - start))
        planted = None
        if "gemma2" in names and "hf" in impls:
            start = time.perf_counter()
            planted = _planted(tmp, pool)
            timings.append(("planted gemma2 bug: search", time.perf_counter() - start))
        timings.append(("total", time.perf_counter() - t0))
        (tmp / "index.html").write_text(index_page(rows, impls, planted, timings))

    with WorkerPool() as pool:  # one worker per implementation serves every checkpoint: libraries load once
        write_atomically(out, write, kind="demo")
    for stage, seconds in timings:
        print(f"demo timing: {stage} {seconds:.1f}s")
    print(f"demo: {len(rows)} checkpoints, implementations {', '.join(impls + ['reference'])}, "
          f"{time.perf_counter() - t0:.1f}s; open {out}/index.html")
    return [r.result for r in rows]


def real_text() -> TextRequest:
    """The real model's input: the shipped text's first REAL_PARAGRAPHS paragraphs, as one prompt."""
    paragraphs = REAL_TEXT.read_text(encoding="utf-8").split("\n\n")[:REAL_PARAGRAPHS]
    return TextRequest(prompts=("\n\n".join(paragraphs),),
                       sources=(f"bughunt/data/{REAL_TEXT.name}, first {REAL_PARAGRAPHS} paragraphs",))


def _real_row(tmp: Path, impls: list[str], pool, timings: list) -> Row:
    """The real model through every implementation of llama (llama.cpp at the file's own type), with generation; then a
    reference-side search for each implementation that departs, reusing its trace and the reference's passes."""
    from bughunt.sources import real_model, resolve

    checkpoint = resolve(real_model())
    choices = [(name if name == "llamacpp" else f"{name}:{dt}") for name in impls
               if supports(name, "llama")
               for dt in (("native",) if name == "llamacpp" else ("fp32", "bf16"))]
    start = time.perf_counter()
    result = compare(checkpoint, choices + ["reference"], reference="reference", out=tmp / REAL, pool=pool, text=real_text(),
                     generate=REAL_GENERATE)
    timings.append((f"{REAL}: compare of {len(choices)} runs with {REAL_GENERATE} generated tokens", time.perf_counter() - start))
    row = Row(REAL, REAL_TITLE, result)
    kept: dict = {}  # the reference's passes, shared by the searches of one checkpoint and input
    for c in to_search(result):
        start = time.perf_counter()
        row.causes[c["candidate"]] = _search(tmp, checkpoint, result, c, pool, kept)
        timings.append((f"{REAL}: search for {c['candidate']}", time.perf_counter() - start))
    return row


def to_search(result: Result) -> list[dict]:
    """The comparisons a search explains: of each implementation that departs, one run (its first departing one in the
    compare's order, fp32 before bf16); a full reference pass of the real model costs seconds, and a search runs up to
    a dozen of them."""
    chosen: dict[str, dict] = {}
    for c in result.comparisons:
        if c["first_above_floor"] is not None:
            chosen.setdefault(c["candidate"].split(":")[0], c)
    return list(chosen.values())


def _search(tmp: Path, checkpoint: Path, result: Result, comparison: dict, pool, kept: dict) -> dict:
    """The reference-side search on one departing candidate of `result` (its trace from the compare, not run again):
    the named cause, and where the search's report is."""
    from bughunt.assemble import safe_name
    from bughunt.errors import BughuntError
    from bughunt.implementations import ImplChoice
    from bughunt.sweep import sweep
    from bughunt.trace import Trace

    label = comparison["candidate"]
    choice = ImplChoice.parse(label)
    entry = next(e for e in result.data["implementations"] if e["label"] == label)
    sub = f"{REAL}-search-{safe_name(label)}"
    dtype = comparison["dtype"]
    try:
        trace = Trace.load((tmp / REAL / entry["trace"]).with_suffix(""))
        searched = sweep(checkpoint, impl=f"{choice.name}:{dtype}", mode="search", side="reference", dtype=_run_dtype(dtype),
                         reference=f"reference:{dtype}", out=tmp / sub, pool=pool, text=real_text(), candidate_trace=trace,
                         reference_traces=kept)
    except BughuntError as e:
        print(f"search for {label} on {REAL}: {e}", flush=True)
        return {"diagnosis": f"the search could not run: {e}", "report": None}
    print(f"search for {label} on {REAL}: {searched.data['diagnosis']}", flush=True)
    return {"diagnosis": searched.data["diagnosis"], "report": f"{sub}/report.html"}


def _run_dtype(dtype: str) -> str:
    """A sweep's --dtype for a candidate at `dtype`: the dtype itself, or fp32 for a quantized type."""
    from bughunt.implementations import DTYPES

    return dtype if dtype in DTYPES else "fp32"


def _tiny_row(tmp: Path, family: str, impls: list[str], pool) -> Row:
    checkpoint = tiny_checkpoint(family, trained=True)
    if "llamacpp" in impls and supports("llamacpp", family):
        _convert_for_llamacpp(family)
    choices = [f"{name}:{dt}" for name in impls if supports(name, family) for dt in TINY_DTYPES]
    result = compare(checkpoint, choices + ["reference"], reference="reference", out=tmp / family, pool=pool,
                     text=default_request())
    return Row(family, f"tiny {family}", result)


def _convert_for_llamacpp(family: str) -> None:
    """The tiny checkpoint's GGUF, converted ahead (a failure shows in its family's row when llama.cpp runs)."""
    from bughunt.errors import BughuntError
    from bughunt.implementations.gguf_convert import convert_many

    try:
        convert_many([(tiny_checkpoint(family, trained=True), "fp32")])
    except BughuntError:
        pass


def _planted(tmp: Path, pool) -> dict:
    """A planted bug, found by name: HF gemma2 run with exact GELU (the Gemma 1 config mistake) against a reference
    that knows nothing about it; the search names the toggle and its ablation."""
    from bughunt.sweep import sweep

    planted = sweep(tiny_checkpoint("gemma2", trained=True), impl="hf", mode="search", candidate_toggles={"gelu": "exact"},
                    out=tmp / "planted-gemma2-gelu", text=default_request(), pool=pool)
    print(f"planted bug (hf gemma2 with gelu=exact): {planted.data['diagnosis']}", flush=True)
    return {"what": "hf on tiny gemma2 with gelu=exact", "diagnosis": planted.data["diagnosis"],
            "report": "planted-gemma2-gelu/report.html"}


# -- the index page ------------------------------------------------------------------------------------------------

def max_multiple(comparison: dict) -> float | None:
    """A comparison's largest multiple of its noise floor over every capture point (inf where a point is not finite)."""
    ratios = [p["ratio_to_floor"] for p in comparison["points"] if p.get("ratio_to_floor") is not None]
    return max(ratios, default=None)


def level(multiple_: float | None) -> int:
    """The colour step of a floor multiple, one per decade: 0 below 1x, 1 up to 10x (the finding threshold), ... 7
    from 1e6x; 7 too where nothing finite was measured (NaN, infinity, no point compared)."""
    if multiple_ is None or not math.isfinite(multiple_):
        return 7
    return 0 if multiple_ < 1 else min(7, 1 + math.floor(math.log10(multiple_)))


def matrix(rows: list[Row], impls: list[str]) -> dict:
    """The index's matrix, from the compares' Results alone: one column per implementation that ran anywhere (in the
    order given), one row per checkpoint (in the order run), and in each cell one run per dtype (its floor multiple, its
    colour step, the first point above the floor, the cause a search named, the report) or why none."""
    columns = [n for n in impls if any(_runs(row, n) for row in rows)]
    table = []
    for row in rows:
        cells = {name: [_run_cell(row, e) for e in _runs(row, name)] for name in columns}
        table.append({"name": row.name, "title": row.title, "report": f"{row.name}/report.html", "cells": cells})
    return {"columns": columns, "rows": table}


def _runs(row: Row, name: str) -> list[dict]:
    """The candidates of implementation `name` in a row's compare (not its reference)."""
    reference = row.result.data["settings"]["reference"]
    return [e for e in row.result.data["implementations"] if e["label"] != reference and e["label"].split(":")[0] == name]


def _run_cell(row: Row, entry: dict) -> dict:
    label = entry["label"]
    cell = {"label": label, "dtype": entry["dtype"], "report": f"{row.name}/report.html", "status": entry["status"]}
    if entry["status"] != "ok":
        return {**cell, "error": entry.get("error") or "failed", "level": None}
    c = row.result.comparison(label)
    m = max_multiple(c)
    cause = row.causes.get(label)
    return {**cell, "multiple": m, "level": level(m), "first": c["first_above_floor"],
            "cause": cause["diagnosis"] if cause else None, "search_report": cause["report"] if cause else None}


def lead(row: Row) -> dict:
    """The real model's section: what it read, the loss on it, and what each implementation generated."""
    d = row.result.data
    text = d["inputs"].get("text") or {}
    losses = []
    for c in row.result.comparisons:
        p = next((p for p in c["points"] if p["point"] == "logits"), {})
        losses.append({"label": c["candidate"], "nll": p.get("nll"), "reference": p.get("nll_reference"),
                       "delta": p.get("delta_nll"), "vs_floor": p.get("delta_nll_ratio_to_floor"),
                       "above": p.get("nll_above_floor"), "cause": (row.causes.get(c["candidate"]) or {}).get("diagnosis")})
    return {"title": row.title, "report": f"{row.name}/report.html", "source": d["checkpoint"].get("source") or {},
            "tokens": len(d["inputs"]["tokens"][0]), "text": text, "losses": losses,
            "generation": _generation(row)}


def _generation(row: Row) -> dict | None:
    """The greedy continuation: the reference's as text, and per candidate the first step that differs."""
    g = row.result.data.get("generation")
    if not g or not g.get("reference"):
        return None
    from bughunt.text import load_tokenizer

    tokenizer = load_tokenizer(Path(row.result.data["checkpoint"]["path"]), "the generated tokens")
    ref = g["reference"]
    return {"steps": g["steps"], "reference": ref["label"], "text": tokenizer.decode(ref["tokens"][0]),
            "candidates": [{"label": c["candidate"], "first_diff": c["first_diff"],
                            "text": tokenizer.decode(c["tokens"][0]) if c["first_diff"] is not None else None}
                           for c in g["candidates"]]}


def index_page(rows: list[Row], impls: list[str], planted: dict | None, timings: list[tuple[str, float]]) -> str:
    real = next((r for r in rows if r.name == REAL), None)
    left_out = {n: why for n, why in LEFT_OUT.items() if available(n) and n not in impls}
    if real is not None:
        ran = {e["label"].split(":")[0] for e in real.result.data["implementations"]}
        left_out.update({f"{n} on {REAL}": why for n, why in REAL_LEFT_OUT.items() if n in impls and n not in ran})
    return render_template("demo_index.html", matrix=matrix(rows, impls), lead=lead(real) if real else None,
                           planted=planted, timings=timings, left_out=left_out, factor=rows[0].result.data["settings"]["floor_factor"] if rows else 10)
