"""Checkpoint files: find the safetensors weights (single or sharded), refuse pickles unless asked,
and check every weight's shape against what the Spec implies."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bughunt.errors import BughuntError
from bughunt.inputs.files import check_regular_file
from bughunt.inputs.weights import (Inventory, check_held_once, check_index_agrees, inventory, read_shard_index, read_weight_map,
                                    size_mismatch)
from bughunt.safetensors_io import map_safetensors, read_header, release
from bughunt.spec import Spec, load_spec

_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "model.pt", "model.pth")


def weight_files(checkpoint: Path, allow_pickle: bool = False) -> list[Path]:
    """The safetensors files holding the weights, in shard order."""
    checkpoint = Path(checkpoint)
    index = checkpoint / "model.safetensors.index.json"
    if os.path.lexists(index):
        files = read_shard_index(index, checkpoint)
        if os.path.lexists(checkpoint / "model.safetensors") and files != ["model.safetensors"]:
            raise BughuntError(f"{checkpoint} holds both model.safetensors and the shard index model.safetensors.index.json "
                               "naming other shards; transformers reads model.safetensors, bughunt's reference the shards, so "
                               "they would compare different weights. Remove whichever is stale.")
        missing = [f for f in files if not os.path.lexists(checkpoint / f)]
        if missing:
            raise BughuntError(f"{index} names shard(s) that are missing: {', '.join(missing)}. Download or copy every shard.")
        return [_weight_file(checkpoint / f) for f in files]
    single = checkpoint / "model.safetensors"
    if os.path.lexists(single):
        return [_weight_file(single)]
    others = sorted(checkpoint.glob("*.safetensors"))
    if others:
        return [_weight_file(f) for f in others]
    pickles = [p for p in _PICKLE_NAMES if (checkpoint / p).exists()] + [p.name for p in checkpoint.glob("pytorch_model-*.bin")]
    if pickles:
        if not allow_pickle:
            raise BughuntError(
                f"{checkpoint} holds only pickled weights ({', '.join(pickles)}). Unpickling runs arbitrary code, so bughunt "
                "refuses it. Convert to safetensors (model.save_pretrained(dir, safe_serialization=True)), or pass "
                "--allow-pickle if you trust the file."
            )
        return [checkpoint / p for p in pickles if p.endswith(".bin") or p.endswith(".pt") or p.endswith(".pth")]
    raise BughuntError(f"{checkpoint} has no weights: no model.safetensors, no shards, no index. Save the model with save_pretrained().")


def _weight_file(path: Path) -> Path:
    return check_regular_file(path, "weight file", "Every weight file must be a readable file inside the checkpoint.")


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
    import pickle

    import torch  # only on the explicit --allow-pickle path

    _weight_file(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise BughuntError(f"{path} cannot be loaded as a PyTorch state dict even with --allow-pickle ({type(e).__name__}: {reason}). "
                           "The file is damaged or holds objects other than tensors; convert it to safetensors where it was made.") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise BughuntError(f"{path} holds {type(sd).__name__}, not a state dict of named tensors. Save model.state_dict(), "
                           "or better, convert to safetensors.")
    return {k: (v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()) for k, v in sd.items()}


def stored_shapes(checkpoint: Path, allow_pickle: bool = False) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, stored dtype) for every tensor, read from headers only. A tensor stored in two files, or a
    shard index that disagrees with what the shards hold, is refused."""
    checkpoint = Path(checkpoint)
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    held: dict[str, list[str]] = {}
    for f in weight_files(checkpoint, allow_pickle):
        if f.suffix == ".safetensors":
            shapes = {name: (tuple(info["shape"]), info["dtype"]) for name, info in read_header(f).items() if name != "__metadata__"}
        else:
            shapes = {name: (tuple(arr.shape), str(arr.dtype)) for name, arr in _read_pickle(f).items()}
        for name in shapes:
            held.setdefault(name, []).append(f.relative_to(checkpoint).as_posix())
        out.update(shapes)
    check_held_once(held, checkpoint)
    index = checkpoint / "model.safetensors.index.json"
    if os.path.lexists(index):
        check_index_agrees(index, read_weight_map(index, checkpoint), held)
    return out


def expected_shapes(spec: Spec) -> dict[str, tuple[int, ...]]:
    """The HF parameter names and shapes the spec implies (lm_head only when not tied)."""
    h, v, i = spec.hidden_size, spec.vocab_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}."
        if spec.fused_qkv:
            shapes[p + "self_attn.qkv_proj.weight"] = (q + 2 * kv, h)
        else:
            shapes[p + "self_attn.q_proj.weight"] = (q, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv, h)
            if spec.attention_bias:
                shapes[p + "self_attn.q_proj.bias"] = (q,)
                shapes[p + "self_attn.k_proj.bias"] = (kv,)
                shapes[p + "self_attn.v_proj.bias"] = (kv,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if spec.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (spec.head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (spec.head_dim,)
        if spec.fused_gate_up:
            shapes[p + "mlp.gate_up_proj.weight"] = (2 * i, h)
        else:
            shapes[p + "mlp.gate_proj.weight"] = (i, h)
            shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if spec.sandwich_norms:
            shapes[p + "pre_feedforward_layernorm.weight"] = (h,)
            shapes[p + "post_feedforward_layernorm.weight"] = (h,)
    return shapes


def validate_weights(checkpoint: Path, spec: Spec, allow_pickle: bool = False) -> Inventory:
    """Raise a BughuntError when config.json implies more values than the files hold, or names every missing weight
    or weight whose shape contradicts the config. Returns the inventory, whose `unexpected` tensors (layers beyond
    num_hidden_layers, stray tensors) no implementation reads: callers report them."""
    stored = stored_shapes(checkpoint, allow_pickle)
    expected = expected_shapes(spec)
    inv = inventory(expected, stored, spec.num_layers)
    problems = [f"missing {name} (expected shape {shape})" for name, shape in inv.missing.items()]
    problems += [f"{name} has shape {have} but config.json implies {want}" for name, (have, want) in inv.mismatched.items()]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        size = size_mismatch(expected, stored, weight_files(checkpoint, allow_pickle))
        raise BughuntError(
            f"weights in {checkpoint} do not match config.json: {f'{size}; ' if size else ''}{shown}. Check that config.json belongs to these weights "
            "(hidden_size, num_attention_heads, num_key_value_heads, head_dim, intermediate_size, vocab_size, num_hidden_layers)."
        )
    return inv


class MappedWeights(dict):
    """name -> read-only memory-mapped array. `release(array)` drops a used array's pages from resident memory."""

    release = staticmethod(release)


def load_weights(checkpoint: Path, spec: Spec | None = None, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """All weights as read-only numpy arrays in their stored dtype, validated against the spec. Safetensors weights
    are memory-mapped: a tensor's bytes are read from disk only when it is used."""
    spec = spec or load_spec(checkpoint)
    validate_weights(checkpoint, spec, allow_pickle)
    out = MappedWeights()
    for f in weight_files(checkpoint, allow_pickle):
        out.update(map_safetensors(f) if f.suffix == ".safetensors" else _read_pickle(f))
    if spec.tie_word_embeddings:
        out.setdefault("lm_head.weight", out["model.embed_tokens.weight"])
    return out
