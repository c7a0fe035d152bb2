"""Real-shaped checkpoints with random weights for the scale benchmark: the shapes (Llama 3.2 1B, Gemma 1 2B,
Llama 3 8B and a small Llama for smoke tests), what they cost (parameters, forward FLOPs), and a writer that
streams seeded bf16 weights to sharded safetensors chunk by chunk, so no tensor is ever whole in memory.

A checkpoint directory appears only when complete (written in a hidden sibling, checked, then renamed), and
carries a marker (`bughunt_scale.json`) so that a rerun reuses it instead of writing gigabytes again.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from bughunt.checkpoint import expected_shapes, validate_weights
from bughunt.errors import BughuntError
from bughunt.memory import matmul_parameters  # noqa: F401  (re-exported: the benchmarks count FLOPs as compare plans with)
from bughunt.spec import Spec, load_spec, spec_from_config

GENERATOR_VERSION = 1
MARKER = "bughunt_scale.json"
SHARD_BYTES = 2 * 1024**3  # at most this many bytes of tensor data per shard (a bigger single tensor gets its own)
CHUNK_ELEMENTS = 8 * 2**20  # elements drawn at a time: 32 MB of float32, 16 MB of bf16
_BF16 = np.dtype(ml_dtypes.bfloat16)


@dataclass(frozen=True)
class Shape:
    """A named model shape: the config.json a real release of that size ships (in the transformers 4.x schema
    that checkpoints on the Hub use), to be filled with random weights."""

    name: str
    description: str
    config: dict

    @property
    def spec(self) -> Spec:
        return spec_from_config(self.config, f"shape {self.name}")


def _llama(**fields) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "attention_dropout": 0.0,
            "hidden_act": "silu", "initializer_range": 0.02, "mlp_bias": False, "pretraining_tp": 1, "rms_norm_eps": 1e-5,
            "torch_dtype": "bfloat16", "use_cache": True, **fields}


SHAPES: dict[str, Shape] = {s.name: s for s in [
    Shape("small", "a 75M-parameter Llama for smoke tests (hidden 768, 8 layers)", _llama(
        hidden_size=768, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=4, head_dim=64,
        intermediate_size=2048, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=True,
        rope_theta=500000.0, rope_scaling=None, bos_token_id=1, eos_token_id=2)),
    # Llama 3.2 1B (meta-llama/Llama-3.2-1B config.json): 1,235,814,400 parameters.
    Shape("llama-1b", "Llama 3.2 1B (1.24B parameters, tied, llama3 RoPE scaling x32)", _llama(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_theta=500000.0, rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                           "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        bos_token_id=128000, eos_token_id=128001)),
    # Gemma 1 2B (google/gemma-2b config.json, with the activation transformers resolves it to): 2,506,172,416.
    Shape("gemma-2b", "Gemma 1 2B (2.51B parameters, tied, multi-query attention, head_dim 256)", {
        "architectures": ["GemmaForCausalLM"], "model_type": "gemma", "attention_bias": False, "attention_dropout": 0.0,
        "hidden_act": "gelu_pytorch_tanh", "hidden_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 8,
        "num_key_value_heads": 1, "head_dim": 256, "intermediate_size": 16384, "vocab_size": 256000,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
        "initializer_range": 0.02, "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        "torch_dtype": "bfloat16", "use_cache": True}),
    # Llama 3 8B (meta-llama/Meta-Llama-3-8B config.json): 8,030,261,248 parameters.
    Shape("llama-8b", "Llama 3 8B (8.03B parameters, untied)", _llama(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False,
        rope_theta=500000.0, rope_scaling=None, bos_token_id=128000, eos_token_id=128001)),
]}


# -- what a shape costs ---------------------------------------------------------------------------------------
def parameter_count(spec: Spec) -> int:
    """Parameters stored in the checkpoint (a tied lm_head counts once)."""
    return sum(int(np.prod(s, dtype=np.int64)) for s in expected_shapes(spec).values())


def forward_flops(spec: Spec, batch: int, seq: int) -> dict[str, int]:
    """Matmul FLOPs of one forward pass over `batch` x `seq` tokens: 2 per multiply-add in every projection and the
    lm_head, plus attention's scores and weighted sum (4 * batch * heads * seq^2 * head_dim per layer, counted in
    full, as a dense implementation computes it before masking)."""
    weights = 2 * batch * seq * matmul_parameters(spec)
    attention = 4 * batch * spec.num_heads * seq * seq * spec.head_dim * spec.num_layers
    return {"weights": weights, "attention": attention, "total": weights + attention}


# -- drawing the weights --------------------------------------------------------------------------------------
def _scale(name: str, shape: tuple[int, ...], spec: Spec) -> tuple[float, float]:
    """(mean, std) of a weight, as bughunt/tiny.py chooses them, so the residual stream stays O(1) through every
    layer and activations stay finite in bf16: linear weights (the lm_head included) N(0, 1/fan_in); embeddings
    N(0, 1) after any embedding scale (Gemma multiplies by sqrt(hidden), so its table is drawn with std
    1/sqrt(hidden)); norm scales spread around 1 (Gemma stores w for a (1 + w) scale)."""
    if name.endswith("norm.weight"):
        return (0.0 if spec.norm_form == "one_plus_w" else 1.0), 0.3
    if "embed_tokens" in name:
        return 0.0, (1.0 / np.sqrt(shape[-1]) if spec.embed_scale else 1.0)
    if name.endswith(".bias"):
        return 0.0, 0.5
    return 0.0, 1.0 / np.sqrt(shape[-1])


def tensor_chunks(name: str, shape: tuple[int, ...], spec: Spec, seed: int, chunk_elements: int = CHUNK_ELEMENTS):
    """The bf16 bytes of one weight, row block by row block (about `chunk_elements` at a time). Each weight has its
    own generator seeded from (seed, name), so a weight's bytes do not depend on which others are written."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode())]))
    mean, std = _scale(name, shape, spec)
    rows, row_len = (shape[0], int(np.prod(shape[1:], dtype=np.int64))) if len(shape) > 1 else (1, shape[0])
    step = max(1, chunk_elements // row_len)
    for start in range(0, rows, step):
        block = rng.standard_normal((min(step, rows - start), row_len), dtype=np.float32)
        block *= np.float32(std)
        if mean:
            block += np.float32(mean)
        yield block.astype(_BF16).tobytes()


# -- the checkpoint layout ------------------------------------------------------------------------------------
def tensor_plan(spec: Spec) -> list[tuple[str, tuple[int, ...]]]:
    """Every stored weight in the order HF writes them: embedding, layers in order, final norm, lm_head."""
    shapes = expected_shapes(spec)
    tail = [n for n in ("model.norm.weight", "lm_head.weight") if n in shapes]
    return [(n, s) for n, s in shapes.items() if n not in tail] + [(n, shapes[n]) for n in tail]


def shard_plan(spec: Spec, shard_bytes: int = SHARD_BYTES) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The weights packed in order into shards of at most `shard_bytes` of data (one bigger tensor alone)."""
    shards: list[list] = [[]]
    size = 0
    for name, shape in tensor_plan(spec):
        nbytes = int(np.prod(shape, dtype=np.int64)) * _BF16.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _write_shard(path: Path, entries: list[tuple[str, tuple[int, ...]]], spec: Spec, seed: int) -> int:
    """Write one safetensors file, streaming each tensor's data after a header computed from the shapes alone."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * _BF16.itemsize
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * ((8 - len(hbytes) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for name, shape in entries:
            for chunk in tensor_chunks(name, shape, spec, seed):
                f.write(chunk)
    return offset


# -- writing and reusing --------------------------------------------------------------------------------------
@dataclass
class CheckpointInfo:
    shape: str
    path: Path
    status: str  # "written" | "reused"
    seconds: float  # time to write, or to check the existing copy
    bytes: int  # tensor data on disk
    parameters: int
    shards: int


def checkpoint_dir(shape: Shape, root: Path, seed: int) -> Path:
    return Path(root) / f"{shape.name}-seed{seed}-g{GENERATOR_VERSION}"


def _marker(shape: Shape, seed: int) -> dict:
    return {"generator": "benchmarks/shapes.py", "generator_version": GENERATOR_VERSION, "shape": shape.name,
            "seed": seed, "dtype": "bfloat16", "config": shape.config}


def _reusable(path: Path, shape: Shape, seed: int) -> dict | None:
    """The marker of a complete copy of this shape at `path`, or None when it is absent, stale or damaged."""
    try:
        marker = json.loads((path / MARKER).read_text())
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(marker, dict) or {k: marker.get(k) for k in _marker(shape, seed)} != _marker(shape, seed) or config != shape.config:
        return None
    files = marker.get("files") or {}
    if not files or not isinstance(marker.get("tensor_bytes"), int):
        return None
    if any(not (path / f).is_file() or (path / f).stat().st_size != size for f, size in files.items()):
        return None
    try:
        validate_weights(path, load_spec(path))
    except BughuntError:
        return None
    return marker


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(final: Path) -> None:
    """Delete hidden partial copies of `final` left by writers that died (their process is gone)."""
    for partial in final.parent.glob(f".{final.name}.partial-*"):
        pid = partial.name.rpartition("-")[2]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def ensure_checkpoint(shape: Shape, root: Path, seed: int = 0, shard_bytes: int = SHARD_BYTES) -> CheckpointInfo:
    """The checkpoint of `shape` under `root`: reused when a complete copy with the same config, seed and generator
    version is there, otherwise written (into a hidden sibling, checked with load_spec and validate_weights, then
    renamed into place). A directory of that name that this writer did not make is never touched."""
    root = Path(root)
    final = checkpoint_dir(shape, root, seed)
    spec = shape.spec
    t0 = time.perf_counter()
    marker = _reusable(final, shape, seed)
    if marker is not None:
        return CheckpointInfo(shape.name, final, "reused", time.perf_counter() - t0, marker["tensor_bytes"],
                              parameter_count(spec), len(marker["files"]) - 2)
    if final.exists() and not (final / MARKER).exists():
        raise BughuntError(f"{final} exists but was not written by benchmarks/shapes.py (it has no {MARKER}). "
                           "Move it away, or pass another --dir.")
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(final)
    shards = shard_plan(spec, shard_bytes)
    needed = sum(int(np.prod(s, dtype=np.int64)) for _, s in tensor_plan(spec)) * _BF16.itemsize
    free = shutil.disk_usage(root).free
    if free < needed * 1.02 + 2**20:
        raise BughuntError(f"writing the {shape.name} checkpoint needs {needed / 1e9:.1f} GB in {root}, but only "
                           f"{free / 1e9:.1f} GB is free. Free some space or pass another --dir.")
    partial = root / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        n = len(shards)
        weight_map, files, total = {}, {}, 0
        for k, entries in enumerate(shards, 1):
            fname = "model.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
            total += _write_shard(partial / fname, entries, spec, seed)
            files[fname] = (partial / fname).stat().st_size
            weight_map.update({name: fname for name, _ in entries})
        for fname, payload in (("config.json", shape.config),
                               ("model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})):
            (partial / fname).write_text(json.dumps(payload, indent=2) + "\n")
            files[fname] = (partial / fname).stat().st_size
        validate_weights(partial, load_spec(partial))
        seconds = time.perf_counter() - t0
        (partial / MARKER).write_text(json.dumps({**_marker(shape, seed), "files": files, "tensor_bytes": total,
                                                  "parameters": parameter_count(spec),
                                                  "write_seconds": round(seconds, 2)}, indent=1) + "\n")
        if final.exists():  # a stale copy of our own (older marker, damaged shard): replace it
            old = root / f".{final.name}.old-{os.getpid()}"
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            partial.rename(final)
        except OSError:  # another writer finished first; its copy is identical
            if _reusable(final, shape, seed) is None:
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return CheckpointInfo(shape.name, final, "written", seconds, total, parameter_count(spec), n)
