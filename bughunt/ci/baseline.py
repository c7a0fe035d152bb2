"""Cells (checkpoint x implementation x dtype x device) and their baselines: one pretty-printed JSON file per cell with
the metrics at every capture point, rounded as the metric table says, so a baseline is stable on one machine and a
change reads well in a diff."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bughunt.ci.matrix import CheckpointEntry
from bughunt.errors import BughuntError
from bughunt.implementations import ImplChoice
from bughunt.inputs.documents import check_baseline_points, read_baseline_json
from bughunt.metric_table import METRICS

BASELINE_SCHEMA = "bughunt.baseline"
BASELINE_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Cell:
    checkpoint: str
    impl: ImplChoice  # with the cell's dtype set
    device: str
    reference: ImplChoice

    @property
    def id(self) -> str:
        return f"{self.checkpoint}/{self.impl.label}/{self.device}"

    @property
    def dtype(self) -> str:
        assert self.impl.dtype is not None
        return self.impl.dtype

    @property
    def baseline_name(self) -> str:
        return "__".join(_safe(s) for s in (self.checkpoint, self.impl.label, self.device)) + ".json"


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "-" if ch == ":" else "_" for ch in text).strip("_")


def cells_of(entry: CheckpointEntry) -> list[Cell]:
    return [Cell(entry.name, dataclasses.replace(impl, dtype=dtype), device, entry.reference)
            for impl in entry.implementations for dtype in entry.dtypes for device in entry.devices]


def tokens_identity(tokens: np.ndarray) -> dict:
    return {"shape": list(tokens.shape), "sha256": hashlib.sha256(np.ascontiguousarray(tokens, dtype="<i8").tobytes()).hexdigest()}


def baseline_document(cell: Cell, comparison: dict, tokens: np.ndarray, branches: bool) -> dict:
    """What a baseline records: the cell, its inputs, and every capture point's metrics (rounded). Nothing that
    varies between runs on one machine (no times, paths or versions)."""
    points = []
    for p in comparison["points"]:
        row = {"point": p["point"]}
        for name, metric in METRICS.items():
            if name in p:
                row[name] = metric.rounded(p.get(name))
        points.append(row)
    return {
        "schema": BASELINE_SCHEMA,
        "schema_version": BASELINE_SCHEMA_VERSION,
        "cell": cell.id,
        "checkpoint": cell.checkpoint,
        "implementation": cell.impl.label,
        "dtype": cell.dtype,
        "device": cell.device,
        "reference": cell.reference.label,
        "branches": branches,
        "tokens": tokens_identity(tokens),
        "first_above_floor": comparison.get("first_above_floor"),
        "points": points,
    }


def dump_baseline(doc: dict) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n"


def read_baseline(path: Path, cell: Cell, tokens: np.ndarray, branches: bool, matrix: Path, baseline_dir: Path) -> dict:
    rerun = f"If the matrix changed on purpose, run `bughunt ci {matrix} --baseline {baseline_dir} --update-baseline` and review the diff."
    if not path.exists():
        raise BughuntError(f"no baseline for cell {cell.id} ({path}). Record the baselines with "
                           f"`bughunt ci {matrix} --baseline {baseline_dir} --update-baseline`, review them and commit them.")
    doc = read_baseline_json(path, "Restore it, or rerun with --update-baseline.")
    if not isinstance(doc, dict) or doc.get("schema") != BASELINE_SCHEMA:
        raise BughuntError(f"{path} is not a bughunt baseline (no \"schema\": \"{BASELINE_SCHEMA}\"). Remove it, or rerun with --update-baseline.")
    if doc.get("schema_version") != BASELINE_SCHEMA_VERSION:
        raise BughuntError(f"baseline {path} has schema_version {doc.get('schema_version')!r}; this bughunt reads {BASELINE_SCHEMA_VERSION}. {rerun}")
    for key, want in (("cell", cell.id), ("reference", cell.reference.label), ("branches", branches), ("tokens", tokens_identity(tokens))):
        if doc.get(key) != want:
            what = "input tokens" if key == "tokens" else key
            raise BughuntError(f"baseline {path} was recorded with a different {what} ({doc.get(key)!r}, now {want!r}), "
                               f"so its numbers do not apply to cell {cell.id}. {rerun}")
    if not isinstance(doc.get("points"), list):
        raise BughuntError(f"baseline {path} has no points list. {rerun}")
    check_baseline_points(doc["points"], path, rerun)
    return doc
