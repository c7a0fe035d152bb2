"""Traces: the named arrays one forward pass produced at the standard capture points, plus metadata.
A Trace round-trips through safetensors (arrays) + JSON (metadata), so runners can live in other processes."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bughunt.errors import BughuntError
from bughunt.safetensors_io import read_safetensors, write_safetensors

_POINT = re.compile(r"^(embed|final_norm|logits|layer\.(\d+)(\.(attn|mlp))?)$")


def capture_points(num_layers: int, branches: bool = False) -> list[str]:
    """Capture point names in forward order: embed, layer.0[, layer.0.attn, layer.0.mlp], ..., final_norm, logits."""
    names = ["embed"]
    for i in range(num_layers):
        if branches:
            names += [f"layer.{i}.attn", f"layer.{i}.mlp"]
        names.append(f"layer.{i}")
    return names + ["final_norm", "logits"]


def point_order(name: str) -> tuple:
    """Sort key that puts capture points in forward order."""
    m = _POINT.match(name)
    if not m:
        return (3, 0, 0, name)
    if name == "embed":
        return (0, 0, 0, "")
    if name == "final_norm":
        return (2, 0, 0, "")
    if name == "logits":
        return (2, 1, 0, "")
    sub = {"attn": 0, "mlp": 1, None: 2}[m.group(4)]
    return (1, int(m.group(2)), sub, "")


def is_residual_point(name: str) -> bool:
    """Points on the residual stream (what the per-layer plot draws): embed, layer.{i}, final_norm."""
    return name in ("embed", "final_norm") or bool(re.fullmatch(r"layer\.\d+", name))


@dataclass
class Trace:
    implementation: str  # label, e.g. "hf" or "reference:bf16"
    arrays: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)

    def points(self) -> list[str]:
        return sorted(self.arrays, key=point_order)

    def save(self, path_stem: Path) -> tuple[Path, Path]:
        """Write <stem>.safetensors and <stem>.json."""
        path_stem = Path(path_stem)
        path_stem.parent.mkdir(parents=True, exist_ok=True)
        arrays_path = path_stem.with_name(path_stem.name + ".safetensors")
        meta_path = path_stem.with_name(path_stem.name + ".json")
        write_safetensors(arrays_path, {k: np.ascontiguousarray(v) for k, v in self.arrays.items()})
        meta_path.write_text(json.dumps({"implementation": self.implementation, "meta": self.meta}, indent=1, default=str))
        return arrays_path, meta_path

    @classmethod
    def load(cls, path_stem: Path) -> "Trace":
        path_stem = Path(path_stem)
        arrays_path = path_stem.with_name(path_stem.name + ".safetensors")
        meta_path = path_stem.with_name(path_stem.name + ".json")
        if not arrays_path.exists() or not meta_path.exists():
            raise BughuntError(f"trace {path_stem} is incomplete: need both {arrays_path.name} and {meta_path.name}.")
        info = json.loads(meta_path.read_text())
        return cls(implementation=info["implementation"], arrays=read_safetensors(arrays_path), meta=info.get("meta", {}))
