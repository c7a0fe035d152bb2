"""The `litgpt` implementation: Lightning AI's litgpt `GPT` model, built from the checkpoint's own config.json and
loaded with litgpt's own `copy_weights_*` conversion functions; capture points taken with forward hooks on its
modules. It runs in its own virtual environment (litgpt pins a huggingface-hub that breaks this project's
transformers): `make litgpt` creates it, and bughunt starts its worker there (see bughunt/envs.py).

litgpt's `convert_hf_checkpoint` builds the config from a model *name* and ignores config.json, and its name presets
carry fields a checkpoint may not have (`rope_adjustments`, sliding windows). This runner builds `litgpt.Config`
from the Spec (the reading of config.json) instead, so litgpt runs the checkpoint that is on disk."""

from __future__ import annotations

import numpy as np

from bughunt.errors import BughuntError
from bughunt.implementations.base import Runner
from bughunt.spec import Spec
from bughunt import points as P

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# litgpt keys behaviour on the config's name: "Gemma" in it gives RMSNorm the (1 + w) scale, "Phi-3" selects the
# fused qkv/gate_up weight map. One name per family, chosen so litgpt takes the path its own presets take.
CONFIG_NAMES = {"gemma": "Gemma-bughunt", "gemma2": "Gemma-2-bughunt", "gemma3": "Gemma-3-bughunt", "llama": "Llama-bughunt",
                "mistral": "Mistral-bughunt", "phi3": "Phi-3-bughunt", "qwen2": "Qwen2.5-bughunt", "qwen3": "Qwen3-bughunt"}


def _rope_adjustments(rope, spec: Spec) -> dict | None:
    """litgpt's `rope_adjustments` for one Rope of the Spec; a scaling litgpt has no form for is refused."""
    if rope.type == "default":
        return None
    if rope.type == "linear":
        return {"factor": rope.factor}
    if rope.type == "llama3":
        e = rope.extra
        return {"factor": rope.factor, "low_freq_factor": e["low_freq_factor"], "high_freq_factor": e["high_freq_factor"],
                "original_max_seq_len": e["original_max_position_embeddings"]}
    raise BughuntError(f"implementation 'litgpt' has no form for RoPE scaling '{rope.type}' (it knows default, linear, llama3 "
                       f"and YaRN with its own attention factor); this checkpoint's config.json asks for it. Run it with hf.")


def litgpt_config_kwargs(spec: Spec) -> dict:
    """Keyword arguments of `litgpt.Config` for this checkpoint, every field from the Spec (config.json)."""
    full, sliding = spec.rope["full"], spec.rope["sliding"]
    gemma = spec.family.startswith("gemma")
    kwargs = dict(
        name=CONFIG_NAMES[spec.family], block_size=spec.max_position_embeddings,
        n_layer=spec.num_layers, n_embd=spec.hidden_size, vocab_size=spec.vocab_size, padded_vocab_size=spec.vocab_size,
        n_head=spec.num_heads, n_query_groups=spec.num_kv_heads, head_size=spec.head_dim,
        intermediate_size=spec.intermediate_size, norm_class_name="RMSNorm", norm_eps=spec.rms_eps,
        parallel_residual=False, bias=False, attn_bias=spec.attention_bias,
        mlp_class_name="GemmaMLP" if gemma else "LLaMAMLP",
        gelu_approximate="tanh" if spec.activation == "gelu_tanh" else "none",
        rotary_percentage=full.partial_rotary_factor, rope_base=full.theta, rope_adjustments=_rope_adjustments(full, spec),
        scale_embeddings=spec.embed_scale is not None, norm_qk=spec.qk_norm,
        post_attention_norm=spec.sandwich_norms, post_mlp_norm=spec.sandwich_norms,
        attention_logit_softcapping=spec.attn_softcap, final_logit_softcapping=spec.final_softcap,
    )
    if gemma and spec.activation == "silu" or not gemma and spec.activation != "silu":
        raise BughuntError(f"implementation 'litgpt' has no {spec.activation} MLP for family {spec.family}.")
    if spec.embed_scale is not None and abs(spec.embed_scale - spec.hidden_size ** 0.5) > 1e-9 * spec.embed_scale:
        raise BughuntError(f"implementation 'litgpt' scales embeddings by sqrt(hidden_size) only; this checkpoint asks for {spec.embed_scale}.")
    if abs(spec.query_scale - spec.head_dim ** -0.5) > 1e-12:
        kwargs["attention_scores_scalar"] = spec.query_scale ** -2  # litgpt scales scores by 1/sqrt(this)
    if spec.sliding_window is not None and "sliding" in spec.layer_types:
        kwargs["sliding_window_size"] = spec.sliding_window
        kwargs["sliding_window_indices"] = [int(t == "sliding") for t in spec.layer_types]
    if sliding != full and "sliding" in spec.layer_types and "full" in spec.layer_types:
        # Gemma 3: local layers use their own base frequency; litgpt gives them plain (unscaled) RoPE
        if sliding.type != "default" or sliding.partial_rotary_factor != full.partial_rotary_factor:
            raise BughuntError("implementation 'litgpt' gives sliding-window layers plain RoPE with their own theta only; "
                               f"this checkpoint's sliding layers use {sliding.type} scaling.")
        kwargs["rope_local_base_freq"] = sliding.theta
        kwargs["rope_indices"] = [int(t == "sliding") for t in spec.layer_types]
    return kwargs


class LitGPTRunner(Runner):
    name = "litgpt"
    install_hint = "make litgpt   (its own environment, .venv-litgpt, beside .venv)"  # how to install its stack (bughunt implementations prints it)
    families = ("gemma", "gemma2", "gemma3", "llama", "mistral", "phi3", "qwen2", "qwen3")
    dtypes = ("fp32", "bf16", "fp16")
    devices = ("cpu", "cuda")
    toggle_support = {"bos": None}

    def _open(self) -> None:
        import torch
        from litgpt import Config
        from litgpt.model import GPT

        if self.device == "cuda" and not torch.cuda.is_available():
            raise BughuntError("--device cuda was asked for, but torch sees no CUDA device here. Use --device cpu.")
        config = Config(**litgpt_config_kwargs(self.spec))
        dtype = getattr(torch, TORCH_DTYPES[self.dtype])
        state = self._convert(config, dtype)
        with torch.device("meta"):
            model = GPT(config)
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise BughuntError(f"litgpt's conversion of {self.checkpoint} does not fit litgpt's model: {e}") from None
        model.cos, model.sin = model.rope_cache(device=torch.device(self.device))  # built on meta above: build it for real
        self.model = model.to(self.device).eval()

    def _convert(self, config, dtype) -> dict:
        """HF weights -> litgpt state dict with litgpt's own copy function for the family (as convert_hf_checkpoint
        picks it from a model name)."""
        from functools import partial

        from litgpt.scripts import convert_hf_checkpoint as conv
        from safetensors.torch import load_file

        from bughunt.checkpoint import weight_files

        family = self.spec.family
        qkv: dict = {}
        copy = {"gemma2": partial(conv.copy_weights_gemma_2, qkv),
                "gemma3": partial(conv.copy_weights_gemma_3, qkv, config=config),
                "phi3": partial(conv.copy_weights_phi, config, qkv),
                "qwen2": partial(conv.copy_weights_qwen_2_5, config, qkv),
                "qwen3": partial(conv.copy_weights_qwen_3, config, qkv)}.get(family, partial(conv.copy_weights_hf_llama, config, qkv))
        state: dict = {}
        for path in weight_files(self.checkpoint, self.allow_pickle):
            copy(state, load_file(str(path)), dtype=dtype)
        return state  # a weight the conversion could not assemble is missing here: load_state_dict(strict=True) says which

    def modules(self) -> dict[str, tuple[object, str]]:
        """capture point -> (module, kind): 'pre' (its input) or 'out' (its output)."""
        blocks = self.model.transformer.h
        points: dict[str, tuple[object, str]] = {"embed": (blocks[0], "pre")}
        for i, block in enumerate(blocks):
            if self.branches:  # Gemma 2/3: the branch output is the post-branch norm's (Identity elsewhere)
                sandwich = self.spec.sandwich_norms
                points[P.branch(i, "attn")] = (block.post_attention_norm if sandwich else block.attn, "out")
                points[P.branch(i, "mlp")] = (block.post_mlp_norm if sandwich else block.mlp, "out")
            points[P.layer(i)] = (block, "out")
        points["final_norm"] = (self.model.transformer.ln_f, "out")
        return points

    def _run(self, tokens: np.ndarray, out) -> None:
        import torch

        if tokens.shape[1] > self.model.max_seq_length:
            raise BughuntError(f"litgpt runs at most {self.model.max_seq_length} tokens for this checkpoint "
                               f"(max_position_embeddings); got {tokens.shape[1]}.")
        handles = []

        def keep(name, x):
            out[name] = x.detach().to(torch.float32).cpu().numpy()

        try:
            for name, (module, kind) in self.modules().items():
                if kind == "pre":
                    handles.append(module.register_forward_pre_hook(lambda m, args, name=name: keep(name, args[0])))
                else:
                    handles.append(module.register_forward_hook(lambda m, args, output, name=name: keep(name, output)))
            with torch.no_grad():
                logits = self.model(torch.from_numpy(tokens).to(self.device))
            keep("logits", logits)
        finally:
            for h in handles:
                h.remove()

    def _close(self) -> None:
        self.model = None

    def versions(self) -> dict[str, str]:
        import importlib.metadata

        import torch

        return {"torch": torch.__version__, "litgpt": importlib.metadata.version("litgpt")}
