"""Traces: the named arrays one forward pass produced at the standard capture points, plus metadata.
A Trace round-trips through safetensors (arrays) + JSON (metadata), so runners can live in other processes.
A runner streams its trace to disk point by point as it captures (`TraceWriter`), and a loaded trace's arrays
are memory-mapped: no step needs a whole trace in memory."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bughunt.errors import BughuntError
from bughunt.safetensors_io import SafetensorsWriter, map_safetensors, write_safetensors
from bughunt import points as P

# Points inside a layer (opt-in: scores and probs are tokens^2 per head), in forward order within the layer.
INNER_POINTS = ("attn.q", "attn.k", "attn.scores", "attn.probs", "attn.out", "mlp.hidden")


def capture_points(num_layers: int, branches: bool = False) -> list[str]:
    """Capture point names in forward order: embed, layer.0[, layer.0.attn, layer.0.mlp], ..., final_norm, logits."""
    names = [P.EMBED]
    for i in range(num_layers):
        if branches:
            names += [P.branch(i, "attn"), P.branch(i, "mlp")]
        names.append(P.layer(i))
    return names + [P.FINAL_NORM, P.LOGITS]


def point_order(name: str) -> tuple:
    """Sort key that puts capture points in forward order."""
    try:
        point = P.parse(name)
    except ValueError:
        return (3, 0, 0, name)
    if point.layer is None:
        return {P.EMBED: (0, 0, 0, ""), P.FINAL_NORM: (2, 0, 0, ""), P.LOGITS: (2, 1, 0, "")}[name]
    within = ("attn.q", "attn.k", "attn.scores", "attn.probs", "attn.out", "attn", "mlp.hidden", "mlp", "")
    return (1, point.layer, within.index(".".join(x for x in (point.branch, point.inner) if x)), "")


def is_residual_point(name: str) -> bool:
    """Points on the residual stream (what the per-layer plot draws): embed, layer.{i}, final_norm."""
    return name in (P.EMBED, P.FINAL_NORM) or P.is_layer_output(name)


def _paths(path_stem: Path) -> tuple[Path, Path]:
    path_stem = Path(path_stem)
    return path_stem.with_name(path_stem.name + ".safetensors"), path_stem.with_name(path_stem.name + ".json")


def _write_meta(meta_path: Path, implementation: str, meta: dict) -> None:
    tmp = meta_path.with_name(meta_path.name + ".tmp")
    tmp.write_text(json.dumps({"implementation": implementation, "meta": meta}, indent=1, default=str))
    tmp.replace(meta_path)


@dataclass
class Trace:
    implementation: str  # label, e.g. "hf" or "reference:bf16"
    arrays: dict[str, np.ndarray]  # in memory, or memory-mapped from `stem`'s file
    meta: dict = field(default_factory=dict)
    stem: Path | None = None  # where the arrays live on disk, when they do

    def points(self) -> list[str]:
        return sorted(self.arrays, key=point_order)

    def save(self, path_stem: Path) -> tuple[Path, Path]:
        """Write <stem>.safetensors and <stem>.json (a trace already on disk is copied file to file, not through memory)."""
        arrays_path, meta_path = _paths(path_stem)
        arrays_path.parent.mkdir(parents=True, exist_ok=True)
        if self.stem is not None and _paths(self.stem)[0].exists():
            tmp = arrays_path.with_name(arrays_path.name + ".tmp")
            shutil.copyfile(_paths(self.stem)[0], tmp)
            tmp.replace(arrays_path)
        else:
            write_safetensors(arrays_path, self.arrays)
        _write_meta(meta_path, self.implementation, self.meta)
        return arrays_path, meta_path

    def save_meta(self) -> None:
        """Rewrite the metadata file of a trace that lives on disk (after its label or metadata changed)."""
        _write_meta(_paths(self.stem)[1], self.implementation, self.meta)

    def move(self, path_stem: Path) -> "Trace":
        """Move an on-disk trace to `path_stem` (a rename when on one file system) and return it re-mapped there."""
        if self.stem is None:
            self.save(path_stem)
        else:
            arrays_path, meta_path = _paths(path_stem)
            arrays_path.parent.mkdir(parents=True, exist_ok=True)
            self.arrays = {}  # drop the old mappings before the file moves
            shutil.move(str(_paths(self.stem)[0]), str(arrays_path))
            _write_meta(meta_path, self.implementation, self.meta)
            old_meta = _paths(self.stem)[1]
            if old_meta.exists() and old_meta != meta_path:
                old_meta.unlink()
        return Trace.load(path_stem)

    @classmethod
    def load(cls, path_stem: Path) -> "Trace":
        arrays_path, meta_path = _paths(path_stem)
        if not arrays_path.exists() or not meta_path.exists():
            raise BughuntError(f"trace {path_stem} is incomplete: need both {arrays_path.name} and {meta_path.name}.")
        info = json.loads(meta_path.read_text())
        return cls(implementation=info["implementation"], arrays=map_safetensors(arrays_path), meta=info.get("meta", {}),
                   stem=Path(path_stem))


class TraceWriter:
    """Where a runner puts its capture points as it produces them. With a `stem`, each point goes to disk at once
    (`<stem>.safetensors`, float32, float64 for the reference) and the finished trace is memory-mapped back; without
    one, points are kept in memory (small runs, tests, the Python API)."""

    def __init__(self, stem: Path | None = None, expected_points: int = 64, store_dtype=np.float32, keep=None):
        self.stem = Path(stem) if stem is not None else None
        self.keep = keep  # a predicate on point names; points it rejects are dropped (e.g. branches not asked for)
        self.store_dtype = np.dtype(store_dtype)
        self.arrays: dict[str, np.ndarray] = {}
        self.names: list[str] = []
        self.writer = None
        self.inner = False  # also capture the points inside each layer (Runner.run(inner=True))
        self.feed = None  # --isolate: layer index -> the reference's input to that layer (Runner.run(feed=...))
        if self.stem is not None:
            self.stem.parent.mkdir(parents=True, exist_ok=True)
            self.writer = SafetensorsWriter(_paths(self.stem)[0], expected_points)

    def __setitem__(self, point: str, array) -> None:
        if self.arrays.get(point) is array:  # a buffer from `buffer()`, now complete
            if self.writer is not None:
                self.arrays.pop(point).flush()
            return
        if self.keep is not None and not self.keep(point):
            return
        array = np.asarray(array)
        if array.dtype != self.store_dtype:
            array = array.astype(self.store_dtype)
        self.names.append(point)
        if self.writer is None:
            self.arrays[point] = array
        else:
            self.writer.add(point, array)

    def buffer(self, point: str, shape: tuple[int, ...]) -> np.ndarray:
        """An array to fill piece by piece (on disk when streaming); assign it back with `writer[point] = buf`."""
        self.names.append(point)
        if self.writer is None:
            self.arrays[point] = np.empty(shape, self.store_dtype)
            return self.arrays[point]
        buf = self.writer.writable(point, shape, self.store_dtype)
        self.arrays[point] = buf
        return buf

    def __contains__(self, point: str) -> bool:
        return point in self.names

    def finish(self, implementation: str, meta: dict) -> Trace:
        if self.writer is None:
            return Trace(implementation, self.arrays, meta)
        for buf in self.arrays.values():
            buf.flush()
        self.arrays = {}
        self.writer.close()
        _write_meta(_paths(self.stem)[1], implementation, meta)
        return Trace.load(self.stem)

    def abort(self) -> None:
        self.arrays = {}
        if self.writer is not None:
            self.writer.abort()
