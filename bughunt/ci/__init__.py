"""The `ci` experiment: run a matrix of cells (checkpoint x implementation x dtype x device, each against the
checkpoint's reference) from a TOML file, judge every cell against its stored baseline and the thresholds, and write
JUnit XML, a Markdown summary and the HTML reports. Exit codes: 0 pass, 1 regression, 2 bad input.

A matrix file (see examples/bughunt.toml for every key):

    reference = "reference"            # what each cell is compared against (float64 reference by default)
    implementations = ["hf"]           # NAME[@PYTHON]; the dtype of a cell comes from `dtypes`
    dtypes = ["fp32", "bf16"]
    devices = ["cpu"]
    tokens = { length = 16, seed = 0 } # or tokens = { ids = [[2, 17, 99]] }
    generate = { steps = 8, top_k = 5 } # optional: greedy generation per cell (metrics gen_matched_steps, gen_topk_ok)

    [[checkpoints]]
    tiny = "llama"                     # a generated tiny checkpoint, or path = "models/x" (relative to this file)

    [[thresholds]]
    metric = "rel_l2"                  # any metric of bughunt.metric_table (rel_l2, log10_l2, cosine, kl, top1, ...)
    points = "*"                       # glob over capture points; the logits-only metrics exist only at "logits"
    baseline_factor = 10               # regression: worse than 10 x the baseline value + slack
    slack = 1e-6

The rooms, in the order a run passes them: `matrix` (the file's grammar, validated once), `run` (plan every group and
baseline, then run and judge), `judge` (one cell against its baseline and thresholds), `baseline` (cells and their
baseline files), `outcome` (the typed records of a run), `outputs` (JUnit, Markdown, HTML) and `shard` (a run cut
into N CI jobs, and their merge).
"""

from bughunt.ci.baseline import (BASELINE_SCHEMA, BASELINE_SCHEMA_VERSION, Cell, baseline_document, cells_of, dump_baseline,
                                 read_baseline, tokens_identity)
from bughunt.ci.judge import Violation, diagnosis_text, judge_cell
from bughunt.ci.matrix import CheckpointEntry, Matrix, Threshold, Tokens, load_matrix, parse_matrix
from bughunt.ci.outcome import CellOutcome, CiRun
from bughunt.ci.outputs import index_html, junit_xml, markdown_summary, write_outputs
from bughunt.ci.run import assign_shards, run_ci
from bughunt.ci.shard import merge, parse_shard, run_shard

__all__ = [
    "BASELINE_SCHEMA", "BASELINE_SCHEMA_VERSION", "Cell", "CellOutcome", "CheckpointEntry", "CiRun", "Matrix", "Threshold",
    "Tokens", "Violation", "assign_shards", "baseline_document", "cells_of", "diagnosis_text", "dump_baseline", "index_html",
    "judge_cell", "junit_xml", "load_matrix", "markdown_summary", "merge", "parse_matrix", "parse_shard", "read_baseline",
    "run_ci", "run_shard", "tokens_identity", "write_outputs",
]
