"""Tiny seeded checkpoints for tests and the demo: real HF-format directories (config.json + safetensors,
written by transformers' save_pretrained, plus a small BPE tokenizer trained from shipped text) whose
weight scales make numerics differences visible.

Weights are drawn with numpy from a seed (not torch's RNG), so the same seed gives the same bytes
whatever the torch version. Checkpoints are cached in the user cache directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bughunt.errors import BughuntError

GENERATOR_VERSION = 3
TINY_FAMILIES = ("gemma", "gemma2", "gemma3", "llama", "mistral", "phi3", "qwen2", "qwen3")

# Sizes shared by every family: small enough for a CPU test, with hidden=48 so sqrt(hidden)=6.928...
# is not representable in bf16 (6.9375), head_dim != hidden/heads where the family allows it, and a
# sliding window shorter than the default input.
_COMMON = dict(vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-6,
               bos_token_id=2, eos_token_id=1, pad_token_id=0)


def tiny_config_dict(family: str) -> tuple[str, dict]:
    """(transformers config class name, kwargs) for the tiny model of a family."""
    c = dict(_COMMON)
    if family == "gemma":
        return "GemmaConfig", {**c, "hidden_act": "gelu_pytorch_tanh", "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    if family == "gemma2":
        return "Gemma2Config", {**c, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 24,
                                "sliding_window": 4, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                                "layer_types": ["sliding_attention", "full_attention"] * 2,
                                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    if family == "gemma3":
        return "Gemma3TextConfig", {**c, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 24,
                                    "sliding_window": 4,
                                    "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
                                    "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}}}
    if family == "llama":
        return "LlamaConfig", {**c, "hidden_act": "silu", "pad_token_id": None, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    if family == "mistral":
        return "MistralConfig", {**c, "hidden_act": "silu", "pad_token_id": None, "sliding_window": 4,
                                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    if family == "phi3":
        c = {k: v for k, v in c.items() if k != "head_dim"}  # phi3 derives head_dim = hidden / heads = 12
        return "Phi3Config", {**c, "hidden_act": "silu", "pad_token_id": 0, "sliding_window": 6,
                              "original_max_position_embeddings": 4096,
                              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}
    if family == "qwen2":
        return "Qwen2Config", {**c, "hidden_act": "silu", "pad_token_id": None, "tie_word_embeddings": False,
                               "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}
    if family == "qwen3":
        return "Qwen3Config", {**c, "hidden_act": "silu", "pad_token_id": None, "tie_word_embeddings": True,
                               "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}
    raise BughuntError(f"no tiny checkpoint for family '{family}'. Choose one of: {', '.join(TINY_FAMILIES)}.")


def _weight(rng: np.random.Generator, name: str, shape: tuple[int, ...], gemma: bool) -> np.ndarray:
    """Draw one weight. Scales are chosen so every layer moves the residual stream by O(1):
    linear weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1) after any embedding scale (Gemma multiplies by
    sqrt(hidden), so its table is drawn with std 1/sqrt(hidden), as real Gemma tables are small), norm scales
    spread around 1. At these scales RMSNorm's epsilon (1e-6 vs 1e-5) is visible above the fp32 floor."""
    if name.endswith("norm.weight"):
        spread = rng.normal(0.0, 0.3, size=shape)
        return spread if gemma else 1.0 + spread  # Gemma stores w for a (1 + w) scale
    if "embed_tokens" in name:
        return rng.normal(0.0, 1.0 / np.sqrt(shape[-1]) if gemma else 1.0, size=shape)
    if name == "lm_head.weight":
        return rng.normal(0.0, 1.0, size=shape)
    if name.endswith(".bias"):
        return rng.normal(0.0, 0.5, size=shape)
    fan_in = shape[-1]
    return rng.normal(0.0, 1.0 / np.sqrt(fan_in), size=shape)


def cache_dir() -> Path:
    env = os.environ.get("BUGHUNT_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("bughunt"))


def make_tiny_checkpoint(family: str, out: Path, seed: int = 0, config_overrides: dict | None = None,
                         dtype: str = "float32", trained: bool = False) -> Path:
    """Build a tiny model of `family` with seeded weights and save it with save_pretrained to `out`. With `trained`,
    the seeded model first learns the shipped text for a few seconds (bughunt/tiny_train.py), deterministically."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise BughuntError(f"--seed must be an integer from 0 to {2**63 - 1}, found {seed!r}. Give a non-negative seed, e.g. --seed 0.")
    import torch
    import transformers

    cls_name, kwargs = tiny_config_dict(family)
    kwargs.update(config_overrides or {})
    config = getattr(transformers, cls_name)(**kwargs)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    with torch.device("cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rng = np.random.default_rng(seed)
    gemma = family.startswith("gemma")
    state = model.state_dict()
    with torch.no_grad():
        for name in sorted(state):
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            arr = _weight(rng, name, tuple(state[name].shape), gemma)
            state[name].copy_(torch.from_numpy(arr.astype(np.float32)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from bughunt.tiny_tokenizer import write_tiny_tokenizer

    write_tiny_tokenizer(out, config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id, family)
    training = None
    if trained:  # on the tokenizer just written, before the weights are saved
        from bughunt.tiny_train import corpus_ids, train

        training = train(model, corpus_ids(out), seed).as_dict()
    model = model.to(torch_dtype)
    model.save_pretrained(out, safe_serialization=True)
    meta = {"family": family, "seed": seed, "generator_version": GENERATOR_VERSION, "overrides": config_overrides or {}}
    if training is not None:
        meta["trained"] = training
    (out / "bughunt_tiny.json").write_text(json.dumps(meta, indent=1))
    return out


def tiny_checkpoint(family: str, seed: int = 0, trained: bool = False) -> Path:
    """The cached tiny checkpoint for a family (trained briefly on the shipped text when `trained`), generated on
    first use."""
    if family not in TINY_FAMILIES:
        raise BughuntError(f"no tiny checkpoint for family '{family}'. Choose one of: {', '.join(TINY_FAMILIES)}.")
    import transformers

    import torch

    kind = f"-trained-torch{torch.__version__}" if trained else ""  # trained weights depend on torch's kernels
    path = cache_dir() / "tiny" / f"{family}-seed{seed}-g{GENERATOR_VERSION}-tf{transformers.__version__}{kind}"
    if (path / "config.json").exists() and (path / "bughunt_tiny.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        make_tiny_checkpoint(family, tmp, seed, trained=trained)
        try:
            tmp.rename(path)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
