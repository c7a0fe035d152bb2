"""The `deepmind` implementation: Google DeepMind's `gemma` library (Flax/JAX) running Gemma, Gemma 2 and Gemma 3
text from the same HF checkpoint. The safetensors weights are converted to the library's parameter tree, the
model config is built from the Spec, and per-layer outputs come from Flax's own `capture_intermediates`.
Config fields the library cannot represent are refused, not approximated."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from bughunt.checkpoint import load_weights
from bughunt.errors import BughuntError
from bughunt.implementations.base import Runner


def _refuse_unrepresentable(spec) -> None:
    problems = []
    if spec.activation != "gelu_tanh":
        problems.append(f"activation {spec.activation} (the library's MLP uses the tanh-approximate GELU)")
    if abs(spec.rms_eps - 1e-6) > 1e-12:
        problems.append(f"rms_norm_eps={spec.rms_eps} (the library fixes RMSNorm epsilon at 1e-6)")
    for kind, rope in spec.rope.items():
        if rope.type not in ("default", "linear"):
            problems.append(f"rope_type {rope.type} on {kind} layers (the library has only linear RoPE scaling)")
        if rope.partial_rotary_factor != 1.0:
            problems.append("partial rotary embeddings")
    if not spec.tie_word_embeddings:
        problems.append("untied output embeddings (the library always decodes with the input embedding)")
    if problems:
        raise BughuntError("the deepmind gemma library cannot represent this checkpoint: " + "; ".join(problems) + ".")


class DeepMindRunner(Runner):
    name = "deepmind"
    families = ("gemma", "gemma2", "gemma3")
    dtypes = ("fp32", "bf16")
    devices = ("cpu", "cuda")
    toggle_support = {"bos": None}

    def _open(self) -> None:
        _refuse_unrepresentable(self.spec)
        if self.device == "cpu":
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
        from bughunt.implementations import _tf_stub

        _tf_stub.install()  # kauldron imports tensorflow at import time; nothing here uses it
        import jax
        import jax.numpy as jnp
        from gemma.gm.nn import _config, _modules, _transformer

        if self.device == "cuda" and not any(d.platform == "gpu" for d in jax.devices()):
            raise BughuntError("--device cuda was asked for, but JAX sees no GPU here. Use --device cpu.")
        self.jax, self.jnp, self._modules = jax, jnp, _modules
        spec = self.spec
        scale = spec.query_scale

        @dataclasses.dataclass(frozen=True)
        class SpecScaleConfig(_config.TransformerConfig):
            """The library offers head_dim^-0.5 or (embed_dim // heads); the spec's exact scale is given here."""

            def query_pre_attn_scalar(self) -> float:
                return scale

        types = [_modules.AttentionType.LOCAL_SLIDING if t == "sliding" else _modules.AttentionType.GLOBAL for t in spec.layer_types]
        local, glob = spec.rope["sliding"], spec.rope["full"]
        config = SpecScaleConfig(
            num_embed=spec.vocab_size, embed_dim=spec.hidden_size, hidden_dim=spec.intermediate_size,
            num_heads=spec.num_heads, head_dim=spec.head_dim, num_kv_heads=spec.num_kv_heads,
            final_logit_softcap=spec.final_softcap, attn_logits_soft_cap=spec.attn_softcap,
            use_post_attn_norm=spec.sandwich_norms, use_post_ffw_norm=spec.sandwich_norms, use_qk_norm=spec.qk_norm,
            attention_types=tuple(types), sliding_window_size=spec.sliding_window,
            local_base_frequency=int(local.theta), global_base_frequency=int(glob.theta),
            local_scale_factor=local.factor if local.type == "linear" else 1.0,
            global_scale_factor=glob.factor if glob.type == "linear" else 1.0,
            transpose_gating_einsum=False,
        )
        act_dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[self.dtype]
        self.model = _transformer.Transformer(config=config, dtype=act_dtype, tokens="batch.input")
        self.params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype=act_dtype), self._convert(load_weights(self.checkpoint, spec)))

    def _convert(self, w: dict) -> dict:
        """HF names and layouts -> the library's tree: q [N*H, D] -> [N, D, H]; o [D, N*H] -> [N, H, D];
        gate/up [F, D] -> gating_einsum [2, D, F]; down [D, F] -> [F, D]; norms copy over (both use 1 + w)."""
        s = self.spec
        a = lambda k: np.asarray(w[k], dtype=np.float32)  # noqa: E731
        D, N, K, H = s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim
        p = {"embedder": {"input_embedding": a("model.embed_tokens.weight")}, "final_norm": {"scale": a("model.norm.weight")}}
        for i in range(s.num_layers):
            pre = f"model.layers.{i}."
            q = a(pre + "self_attn.q_proj.weight").reshape(N, H, D).transpose(0, 2, 1)
            k = a(pre + "self_attn.k_proj.weight").reshape(K, H, D).transpose(0, 2, 1)
            v = a(pre + "self_attn.v_proj.weight").reshape(K, H, D).transpose(0, 2, 1)
            attn = {"attn_vec_einsum": {"w": a(pre + "self_attn.o_proj.weight").T.reshape(N, H, D)}}
            if K == N:  # the library fuses q, k, v into one einsum when there is one kv head per query head
                attn["qkv_einsum"] = {"w": np.stack([q, k, v])}
            else:
                attn["q_einsum"] = {"w": q}
                attn["kv_einsum"] = {"w": np.stack([k, v])}
            if s.qk_norm:
                attn["_query_norm"] = {"scale": a(pre + "self_attn.q_norm.weight")}
                attn["_key_norm"] = {"scale": a(pre + "self_attn.k_norm.weight")}
            block = {"attn": attn, "pre_attention_norm": {"scale": a(pre + "input_layernorm.weight")},
                     "mlp": {"gating_einsum": np.stack([a(pre + "mlp.gate_proj.weight").T, a(pre + "mlp.up_proj.weight").T]),
                             "linear": a(pre + "mlp.down_proj.weight").T}}
            if s.sandwich_norms:
                block["post_attention_norm"] = {"scale": a(pre + "post_attention_layernorm.weight")}
                block["pre_ffw_norm"] = {"scale": a(pre + "pre_feedforward_layernorm.weight")}
                block["post_ffw_norm"] = {"scale": a(pre + "post_feedforward_layernorm.weight")}
            else:  # Gemma 1: HF's post_attention_layernorm is the norm before the MLP
                block["pre_ffw_norm"] = {"scale": a(pre + "post_attention_layernorm.weight")}
            p[f"layer_{i}"] = block
        return p

    exposes_weights = True

    def loaded_weights(self):
        """The parameter tree the library runs with, back in HF names and layouts: the inverse of `_convert`'s
        documented reshapes (q [N, D, H] -> [N*H, D]; o [N, H, D] -> [D, N*H]; gating_einsum [2, D, F] -> gate and
        up [F, D]; linear [F, D] -> down [D, F]); bf16 comes back as float32, which holds it exactly."""
        s = self.spec
        D, N, K, H = s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim
        a = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
        heads = lambda w, n: a(w).transpose(0, 2, 1).reshape(n * H, D)  # noqa: E731 - [n, D, H] -> [n*H, D]
        p = self.params
        yield "model.embed_tokens.weight", a(p["embedder"]["input_embedding"])
        for i in range(s.num_layers):
            pre, block = f"model.layers.{i}.", p[f"layer_{i}"]
            attn = block["attn"]
            if "qkv_einsum" in attn:
                q, k, v = (attn["qkv_einsum"]["w"][j] for j in range(3))
            else:
                q, (k, v) = attn["q_einsum"]["w"], (attn["kv_einsum"]["w"][j] for j in range(2))
            yield pre + "self_attn.q_proj.weight", heads(q, N)
            yield pre + "self_attn.k_proj.weight", heads(k, K)
            yield pre + "self_attn.v_proj.weight", heads(v, K)
            yield pre + "self_attn.o_proj.weight", a(attn["attn_vec_einsum"]["w"]).reshape(N * H, D).T
            if s.qk_norm:
                yield pre + "self_attn.q_norm.weight", a(attn["_query_norm"]["scale"])
                yield pre + "self_attn.k_norm.weight", a(attn["_key_norm"]["scale"])
            yield pre + "input_layernorm.weight", a(block["pre_attention_norm"]["scale"])
            gating = a(block["mlp"]["gating_einsum"])
            yield pre + "mlp.gate_proj.weight", gating[0].T
            yield pre + "mlp.up_proj.weight", gating[1].T
            yield pre + "mlp.down_proj.weight", a(block["mlp"]["linear"]).T
            if s.sandwich_norms:
                yield pre + "post_attention_layernorm.weight", a(block["post_attention_norm"]["scale"])
                yield pre + "pre_feedforward_layernorm.weight", a(block["pre_ffw_norm"]["scale"])
                yield pre + "post_feedforward_layernorm.weight", a(block["post_ffw_norm"]["scale"])
            else:
                yield pre + "post_attention_layernorm.weight", a(block["pre_ffw_norm"]["scale"])
        yield "model.norm.weight", a(p["final_norm"]["scale"])

    def _run(self, tokens: np.ndarray, out=None) -> dict[str, np.ndarray]:
        jnp, modules = self.jnp, self._modules
        b, t = tokens.shape
        ids = jnp.asarray(tokens, jnp.int32)
        # Explicit positions and causal mask: by default the library treats token id 0 as padding.
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))

        def wanted(module, method):
            return ((isinstance(module, modules.Block) and method == "__call__")
                    or (isinstance(module, modules.Embedder) and method == "encode")
                    or (module.name == "final_norm" and method == "__call__"))

        out, state = self.model.apply({"params": self.params}, ids, positions=positions, attention_mask=mask,
                                      capture_intermediates=wanted, mutable=["intermediates"])
        inter = state["intermediates"]
        arrays = {"embed": inter["embedder"]["encode"][0]}
        for i in range(self.spec.num_layers):
            arrays[f"layer.{i}"] = inter[f"layer_{i}"]["__call__"][0][1]  # Block returns (cache, x)
        arrays["final_norm"] = inter["final_norm"]["__call__"][0]
        arrays["logits"] = out.logits
        return {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}

    def versions(self) -> dict[str, str]:
        from importlib import metadata

        import jax

        return {"gemma": metadata.version("gemma"), "jax": jax.__version__, "flax": metadata.version("flax"),
                "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision)}
