"""The weight files of a checkpoint against its config.json, both ways: the shard index (a JSON object whose
weight_map names safetensors files inside the checkpoint), the number of values config.json implies against the
number the files hold (so an absurd config is refused before anything is allocated), the tensors config.json
implies that are missing or have another shape, the tensors stored that it does not imply (layers beyond
num_hidden_layers, stray tensors), and NaN/Inf in every tensor, scanned a chunk at a time."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Iterator

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from bughunt.errors import BughuntError
from bughunt.inputs.files import read_json, validation_message

INDEX_FIX = "Re-save the checkpoint with save_pretrained(), or rewrite the index so weight_map maps each tensor name to a shard file."
CHUNK_BYTES = 16 * 1024 * 1024  # NaN/Inf scan: at most this many bytes of one tensor are upcast at a time


class ShardIndex(BaseModel):
    model_config = ConfigDict(extra="allow")

    metadata: dict | None = None
    weight_map: Annotated[dict[StrictStr, StrictStr], Field(min_length=1)]


def read_weight_map(index: Path, checkpoint: Path) -> dict[str, str]:
    """The weight_map of model.safetensors.index.json (tensor name -> shard file name), each shard name checked to be
    a plain safetensors file name inside the checkpoint (no absolute path, no '..')."""
    doc = read_json(index, "shard index", INDEX_FIX)
    if not isinstance(doc, dict):
        raise BughuntError(f"shard index {index} must hold a JSON object with a 'weight_map' object, found {type(doc).__name__}. {INDEX_FIX}")
    try:
        weight_map = ShardIndex.model_validate(doc).weight_map
    except ValidationError as e:
        raise BughuntError(validation_message(e, f"shard index {index}", INDEX_FIX)) from None
    for name in sorted(set(weight_map.values())):
        parts = PurePosixPath(name).parts
        if not name or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name or "\0" in name or not name.endswith(".safetensors"):
            tensor = next(t for t, f in weight_map.items() if f == name)
            raise BughuntError(f"shard index {index}: weight_map[{tensor!r}] is {name!r}; expected the name of a .safetensors "
                               f"file inside {checkpoint} (no absolute path, no '..'). {INDEX_FIX}")
    return weight_map


def read_shard_index(index: Path, checkpoint: Path) -> list[str]:
    """The shard file names of model.safetensors.index.json, in sorted order, each once however it is spelled
    ('./a.safetensors' is 'a.safetensors'; see `read_weight_map`)."""
    return sorted({PurePosixPath(name).as_posix() for name in read_weight_map(index, checkpoint).values()})


def _listed(items: list[str], limit: int = 4) -> str:
    return "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def check_held_once(held: dict[str, list[str]], checkpoint: Path) -> None:
    """`held`: tensor name -> the weight files (names relative to the checkpoint) that store it. A tensor stored in
    two files is refused: which copy an implementation reads would depend on its loading order."""
    twice = [f"{name} (in {' and '.join(files)})" for name, files in held.items() if len(files) > 1]
    if twice:
        raise BughuntError(f"weights in {checkpoint}: {len(twice)} tensor(s) are stored in more than one file: {_listed(twice)}. "
                           "Each tensor must be stored once; remove the stale file or re-save the checkpoint with save_pretrained().")


def check_index_agrees(index: Path, weight_map: dict[str, str], held: dict[str, list[str]]) -> None:
    """The shard index against what the shards hold: every tensor it lists is in the shard it names, and every
    tensor the shards hold is listed. `held` maps tensor name -> files holding it (already checked: one each)."""
    problems = []
    for name, shard in weight_map.items():
        files = held.get(name, [])
        if PurePosixPath(shard).as_posix() in files:
            continue
        where = f"it is in {files[0]}" if files else "no shard holds it"
        problems.append(f"the index places {name} in {shard}, which does not hold it ({where})")
    unlisted = [f"{files[0]} holds {name}, which the index does not list" for name, files in held.items() if name not in weight_map]
    problems += unlisted
    if problems:
        raise BughuntError(f"shard index {index} disagrees with the shards ({len(problems)} problem(s)): {_listed(problems)}. "
                           f"{INDEX_FIX}")


# ---- config.json against the weights ----------------------------------------------------------------------


@dataclass
class Inventory:
    """How the stored tensors compare with the ones config.json implies."""

    missing: dict[str, tuple[int, ...]] = field(default_factory=dict)  # name -> expected shape
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)  # name -> (stored, expected)
    extra_layers: dict[int, list[str]] = field(default_factory=dict)  # layer index >= num_hidden_layers -> names
    stray: list[str] = field(default_factory=list)  # other stored tensors config.json does not imply

    @property
    def unexpected(self) -> list[str]:
        return [n for names in self.extra_layers.values() for n in names] + self.stray

    def describe_unexpected(self, num_layers: int) -> str:
        parts = []
        if self.extra_layers:
            layers = sorted(self.extra_layers)
            span = f"{layers[0]}" if len(layers) == 1 else f"{layers[0]}..{layers[-1]}"
            parts.append(f"{len(layers)} layer(s) beyond num_hidden_layers={num_layers} (model.layers.{span}, "
                         f"{sum(len(v) for v in self.extra_layers.values())} tensors)")
        if self.stray:
            shown = ", ".join(self.stray[:5]) + (f" and {len(self.stray) - 5} more" if len(self.stray) > 5 else "")
            parts.append(f"{len(self.stray)} tensor(s) config.json does not imply ({shown})")
        return "; ".join(parts)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# Stored beside the weights by some exporters, never read by any implementation.
_HARMLESS = re.compile(r"(^|\.)rotary_emb\.inv_freq$|(^|\.)masked_bias$|\.attn\.bias$")


def inventory(expected: dict[str, tuple[int, ...]], stored: dict[str, tuple[tuple[int, ...], str]], num_layers: int) -> Inventory:
    inv = Inventory()
    for name, shape in expected.items():
        if name not in stored:
            inv.missing[name] = shape
        elif tuple(stored[name][0]) != tuple(shape):
            inv.mismatched[name] = (tuple(stored[name][0]), tuple(shape))
    for name in stored:
        if name in expected or _HARMLESS.search(name):
            continue
        m = _LAYER.match(name)
        if m and int(m.group(1)) >= num_layers:
            inv.extra_layers.setdefault(int(m.group(1)), []).append(name)
        elif name != "lm_head.weight":  # a stored copy of tied embeddings is lint's business (tied-but-lm-head-*)
            inv.stray.append(name)
    return inv


def size_mismatch(expected: dict[str, tuple[int, ...]], stored: dict[str, tuple[tuple[int, ...], str]], files: list[Path]) -> str | None:
    """A sentence when config.json implies more values than the weight files hold (their headers were checked against
    the file sizes, so the stored shapes are backed by bytes); None otherwise."""
    implied = sum(math.prod(s) for s in expected.values())
    held = sum(math.prod(s) for s, _ in stored.values())
    if implied <= held:
        return None
    size = sum(f.stat().st_size for f in files)
    embed = expected.get("model.embed_tokens.weight")
    detail = f" (the embedding alone is {embed[0]} x {embed[1]})" if embed else ""
    return (f"config.json implies a model of {implied:.3g} parameters{detail}, but the weight files hold only {held:.3g} values "
            f"({size} bytes)")


# ---- NaN/Inf, chunk by chunk -------------------------------------------------------------------------------


@dataclass
class NonFinite:
    tensor: str
    nan: int
    inf: int
    first_row: int  # the first row (index along the first axis) holding one


def scan_nonfinite(tensors: dict[str, np.ndarray], chunk_bytes: int = CHUNK_BYTES) -> Iterator[NonFinite]:
    """Every floating tensor of one safetensors file (`safetensors_io.map_safetensors`: memory-mapped), checked a
    block of rows at a time, so no tensor is ever read whole."""
    from bughunt.safetensors_io import release

    for name, tensor in tensors.items():
        dt = tensor.dtype
        if not tensor.shape or tensor.size == 0 or not (dt.kind == "f" or dt.name == "bfloat16"):
            continue
        row_bytes = max(1, tensor.nbytes // tensor.shape[0])
        step = max(1, chunk_bytes // row_bytes)
        nan = inf = 0
        first = None
        for i in range(0, tensor.shape[0], step):
            block = np.asarray(tensor[i:i + step], dtype=np.float32)
            release(tensor[i:i + step])
            n, f = np.isnan(block), np.isinf(block)
            nan, inf = nan + int(n.sum()), inf + int(f.sum())
            if first is None and (n.any() or f.any()):
                bad = (n | f).reshape(block.shape[0], -1).any(axis=1)
                first = i + int(np.argmax(bad))
        if nan or inf:
            yield NonFinite(name, nan, inf, first if first is not None else 0)
