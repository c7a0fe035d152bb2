"""Tiny DeepMind `gemma` (gm.nn.Transformer) models vs HF transformers, layer by layer.

Run:  /tmp/inv4/venv/bin/python /tmp/inv4/gemma_tiny.py [--show-params]
Builds tiny gemma1 / gemma2 / gemma3-text HF models (random fp32 weights, eager attn),
converts their state_dict to the gemma param tree, runs both on the same 8 token ids,
prints max|diff| for logits and for each decoder layer output.
Nothing is downloaded.
"""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tf_stub  # noqa: E402  (kauldron imports tensorflow at import time)

tf_stub.install()

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from gemma import gm  # noqa: E402
from gemma.gm.nn import _modules  # noqa: E402  (AttentionType, Block)
from gemma.gm.nn import _config  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

G, L = _modules.AttentionType.GLOBAL, _modules.AttentionType.LOCAL_SLIDING


@dataclasses.dataclass(frozen=True)
class ExactScaleConfig(_config.TransformerConfig):
    """TransformerConfig whose query scale is exactly HF's query_pre_attn_scalar**-0.5.

    (Built-in enum only offers head_dim**-0.5 or (embed_dim//num_heads)**-0.5.)"""
    hf_query_pre_attn_scalar: float | None = None

    def query_pre_attn_scalar(self) -> float:
        if self.hf_query_pre_attn_scalar is None:
            return super().query_pre_attn_scalar()
        return float(self.hf_query_pre_attn_scalar) ** -0.5


# ---------------------------------------------------------------- HF -> gemma config
def gemma_config_from_hf(hf_cfg):
    mt = hf_cfg.model_type
    n_layers = hf_cfg.num_hidden_layers
    common = dict(
        num_embed=hf_cfg.vocab_size,
        embed_dim=hf_cfg.hidden_size,
        hidden_dim=hf_cfg.intermediate_size,
        num_heads=hf_cfg.num_attention_heads,
        head_dim=hf_cfg.head_dim,
        num_kv_heads=hf_cfg.num_key_value_heads,
        transpose_gating_einsum=False,  # our converter emits [2, D, F]
    )
    rp = hf_cfg.rope_parameters
    if mt == "gemma":
        return ExactScaleConfig(
            **common,
            final_logit_softcap=None,
            use_post_attn_norm=False,
            use_post_ffw_norm=False,
            attention_types=(G,) * n_layers,
            hf_query_pre_attn_scalar=hf_cfg.head_dim,  # HF gemma1: head_dim**-0.5
            local_base_frequency=int(rp["rope_theta"]),
            global_base_frequency=int(rp["rope_theta"]),
        )
    lt = [L if t == "sliding_attention" else G for t in hf_cfg.layer_types]
    if mt == "gemma2":
        return ExactScaleConfig(
            **common,
            final_logit_softcap=hf_cfg.final_logit_softcapping,
            attn_logits_soft_cap=hf_cfg.attn_logit_softcapping,
            use_post_attn_norm=True,
            use_post_ffw_norm=True,
            attention_types=tuple(lt),
            sliding_window_size=hf_cfg.sliding_window,
            hf_query_pre_attn_scalar=hf_cfg.query_pre_attn_scalar,
            local_base_frequency=int(rp["rope_theta"]),
            global_base_frequency=int(rp["rope_theta"]),
        )
    if mt == "gemma3_text":
        loc, glo = rp["sliding_attention"], rp["full_attention"]
        return ExactScaleConfig(
            **common,
            final_logit_softcap=hf_cfg.final_logit_softcapping,
            attn_logits_soft_cap=hf_cfg.attn_logit_softcapping,
            use_post_attn_norm=True,
            use_post_ffw_norm=True,
            use_qk_norm=True,
            attention_types=tuple(lt),
            sliding_window_size=hf_cfg.sliding_window,
            hf_query_pre_attn_scalar=hf_cfg.query_pre_attn_scalar,
            local_base_frequency=int(loc["rope_theta"]),
            global_base_frequency=int(glo["rope_theta"]),
            # gemma only has *linear* RoPE scaling (positions / factor)
            local_scale_factor=float(loc.get("factor", 1.0)) if loc.get("rope_type") == "linear" else 1.0,
            global_scale_factor=float(glo.get("factor", 1.0)) if glo.get("rope_type") == "linear" else 1.0,
        )
    raise ValueError(f"unsupported model_type {mt}")


# ---------------------------------------------------------------- HF -> gemma params
def hf_to_gemma_params(sd, hf_cfg, dtype=np.float32):
    """sd: HF state_dict (torch tensors, keys model.*). Returns gemma param tree (nested dicts)."""
    a = lambda k: sd[k].detach().to(torch.float32).cpu().numpy().astype(dtype)  # noqa: E731
    D, N, K, H = hf_cfg.hidden_size, hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads, hf_cfg.head_dim
    v1 = hf_cfg.model_type == "gemma"
    p = {"embedder": {"input_embedding": a("model.embed_tokens.weight")},  # [V, D], tied
         "final_norm": {"scale": a("model.norm.weight")}}
    for i in range(hf_cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        q = a(pre + "self_attn.q_proj.weight").reshape(N, H, D).transpose(0, 2, 1)  # [N, D, H]
        k = a(pre + "self_attn.k_proj.weight").reshape(K, H, D).transpose(0, 2, 1)  # [K, D, H]
        v = a(pre + "self_attn.v_proj.weight").reshape(K, H, D).transpose(0, 2, 1)
        o = a(pre + "self_attn.o_proj.weight").T.reshape(N, H, D)  # [N, H, D]
        attn = {"attn_vec_einsum": {"w": o}}
        if K == N:  # gemma uses one fused qkv einsum when num_kv_heads == num_heads
            attn["qkv_einsum"] = {"w": np.stack([q, k, v])}  # [3, N, D, H]
        else:
            attn["q_einsum"] = {"w": q}
            attn["kv_einsum"] = {"w": np.stack([k, v])}  # [2, K, D, H]
        if pre + "self_attn.q_norm.weight" in sd:
            attn["_query_norm"] = {"scale": a(pre + "self_attn.q_norm.weight")}
            attn["_key_norm"] = {"scale": a(pre + "self_attn.k_norm.weight")}
        gate, up = a(pre + "mlp.gate_proj.weight"), a(pre + "mlp.up_proj.weight")  # [F, D]
        mlp = {"gating_einsum": np.stack([gate.T, up.T]),  # [2, D, F]; [0] goes through gelu
               "linear": a(pre + "mlp.down_proj.weight").T}  # [F, D]
        blk = {"attn": attn, "mlp": mlp,
               "pre_attention_norm": {"scale": a(pre + "input_layernorm.weight")}}
        if v1:  # HF gemma1 "post_attention_layernorm" is the pre-FFW norm
            blk["pre_ffw_norm"] = {"scale": a(pre + "post_attention_layernorm.weight")}
        else:
            blk["post_attention_norm"] = {"scale": a(pre + "post_attention_layernorm.weight")}
            blk["pre_ffw_norm"] = {"scale": a(pre + "pre_feedforward_layernorm.weight")}
            blk["post_ffw_norm"] = {"scale": a(pre + "post_feedforward_layernorm.weight")}
        p[f"layer_{i}"] = blk
    return p


# ---------------------------------------------------------------- forward helpers
def gemma_forward(model, params, ids):
    """ids: int [B, T]. Returns (logits, [per-layer outputs])."""
    ids = jnp.asarray(ids, jnp.int32)
    B, T = ids.shape
    # Explicit positions + causal mask: the default derives them from `tokens != 0`
    # (token id 0 = padding), which would break on inputs containing id 0.
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    out, state = model.apply(
        {"params": params}, ids, positions=positions, attention_mask=mask,
        capture_intermediates=lambda mdl, name: isinstance(mdl, _modules.Block) and name == "__call__",
        mutable=["intermediates"],
    )
    inter = state["intermediates"]
    # Block.__call__ returns (cache, x); flax stores a tuple of call results
    layers = [inter[f"layer_{i}"]["__call__"][0][1] for i in range(model.config.num_layers)]
    return np.asarray(out.logits), [np.asarray(x) for x in layers]


def hf_forward(hf, ids):
    outs = []
    hooks = [lyr.register_forward_hook(lambda m, i, o: outs.append((o[0] if isinstance(o, tuple) else o).detach()))
             for lyr in hf.model.layers]
    with torch.no_grad():
        logits = hf(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits
    for h in hooks:
        h.remove()
    return logits.numpy(), [o.numpy() for o in outs]


def make_hf(family, num_kv_heads=2):
    import transformers as tr
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=num_kv_heads, head_dim=16,
                  max_position_embeddings=64, attn_implementation="eager")
    if family == "gemma":
        cfg = tr.GemmaConfig(**common)
        cls = tr.GemmaForCausalLM
    elif family == "gemma2":
        cfg = tr.Gemma2Config(**common, sliding_window=4, query_pre_attn_scalar=32,
                              final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
        cls = tr.Gemma2ForCausalLM
    elif family == "gemma3":
        common["num_hidden_layers"] = 3
        cfg = tr.Gemma3TextConfig(**common, sliding_window=4, query_pre_attn_scalar=32,
                                  layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                   "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                      "rope_theta": 1000000.0}})
        cls = tr.Gemma3ForCausalLM
    torch.manual_seed(0)
    hf = cls(cfg).eval().float()
    randomize_(hf)
    return hf


def randomize_(hf):
    """HF init (std 0.02, norms 0) gives near-uniform attention that hides q/k/rope bugs:
    use O(1) logits instead, and random norm weights so the (1+w) convention is tested."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed" in n else 1.5 / p.shape[1] ** 0.5))
    return hf


def compare(family, num_kv_heads, show_params=False):
    hf = make_hf(family, num_kv_heads)
    cfg = gemma_config_from_hf(hf.config)
    model = gm.nn.Transformer(config=cfg, dtype=jnp.float32, tokens="batch.input")
    params = hf_to_gemma_params(hf.state_dict(), hf.config)
    if show_params:
        # structure check vs. model.init (random init, nothing downloaded)
        init = model.init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32))["params"]
        print(jax.tree_util.tree_map(lambda x: (x.shape, str(x.dtype)), init))
    init_shapes = jax.tree_util.tree_map(lambda x: x.shape, jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32)))["params"])
    conv_shapes = jax.tree_util.tree_map(lambda x: x.shape, params)
    assert init_shapes == conv_shapes, (init_shapes, conv_shapes)
    ids = np.array([[2, 17, 0, 99, 255, 3, 42, 7]])
    g_logits, g_layers = gemma_forward(model, params, ids)
    h_logits, h_layers = hf_forward(hf, ids)
    d = [float(np.abs(a - b).max()) for a, b in zip(g_layers, h_layers)]
    print(f"{family:7s} kv={num_kv_heads}: logits {g_logits.shape} max|diff|={np.abs(g_logits - h_logits).max():.2e}  "
          f"(max|logit|={np.abs(h_logits).max():.1f}); per-layer max|diff| = {['%.1e' % x for x in d]} "
          f"(max|h| {['%.0f' % np.abs(x).max() for x in h_layers]})")


def demo_random_init():
    """Tiny gemma2 from scratch: init, forward on 8 ids, capture per-layer outputs."""
    cfg = _config.TransformerConfig(
        num_embed=256, embed_dim=64, hidden_dim=128, num_heads=4, head_dim=16, num_kv_heads=2,
        final_logit_softcap=30.0, attn_logits_soft_cap=50.0, use_post_attn_norm=True,
        use_post_ffw_norm=True, attention_types=(L, G), sliding_window_size=4,
        query_pre_attn_norm=_config.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM)
    model = gm.nn.Transformer(config=cfg, dtype=jnp.float32, tokens="batch.input")
    ids = jnp.arange(1, 9, dtype=jnp.int32)[None]
    params = model.init(jax.random.PRNGKey(0), ids)["params"]
    print("param tree:", jax.tree_util.tree_map(lambda x: (x.shape, str(x.dtype)), params))
    logits, layers = gemma_forward(model, params, ids)
    print("logits", logits.shape, "per-layer outputs", [x.shape for x in layers])
    # alternative: final (normed) hidden state directly
    out = model.apply({"params": params}, ids, return_hidden_states=True)
    print("return_hidden_states ->", out.hidden_states.shape, "(after final_norm)")


if __name__ == "__main__":
    demo_random_init()
    show = "--show-params" in sys.argv
    compare("gemma", 4, show)   # MHA -> fused qkv_einsum
    compare("gemma", 1, show)   # MQA
    compare("gemma2", 2, show)  # GQA, softcaps, sliding window 4, query_pre_attn_scalar=32
    compare("gemma2", 4, show)
    compare("gemma3", 2, show)  # qk-norm, local/global rope, linear scaling on global
