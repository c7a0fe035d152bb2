"""Gemma 3 text forward pass in float64, from the Gemma 3 technical report (Gemma Team, 2025) and config.json.

Differences from Gemma 2 (report section 2): QK-norm (RMSNorm with (1 + w) on each query and key head,
replacing attention soft-capping), a 5:1 pattern of local:global layers (layer_types), and a separate
RoPE base for local layers (10k) and global layers (1M, optionally linearly scaled).
"""

from __future__ import annotations

import numpy as np

from bughunt import points as P
from reference_impls._capture import capture_inner, layer_input
from reference_impls._numerics import Policy, merge_heads, resolve, split_heads
from reference_impls._weights import stream_weights


def forward(weights: dict, spec, tokens: np.ndarray, policy: Policy, out):
    n, act, norm_dtype = resolve(spec, policy, default_norm_dtype="fp32")
    W = stream_weights(n, weights)  # each tensor read from disk, in float64, only while its layer runs
    norm = lambda x, w: n.rms_norm(x, w, spec.rms_eps, "one_plus_w", norm_dtype)  # noqa: E731
    b, s = tokens.shape
    nh, nkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim

    scale = n.r(spec.embed_scale) if policy.embed_scale_dtype == "model" else n.r32(spec.embed_scale)
    x = n.r(W.rows("model.embed_tokens.weight", tokens) * scale)
    out["embed"] = x

    tables = {}
    for kind, rope in spec.rope.items():  # one RoPE table per layer type: local and global bases differ
        tables[kind] = n.rope_cos_sin(np.arange(s), rope, int(hd * rope.partial_rotary_factor), spec)

    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        x = layer_input(out, i, x, n)  # --isolate: the reference's input to this layer
        kind = spec.layer_types[i]
        window = spec.sliding_window if kind == "sliding" else None
        cos, sin = tables[kind]
        h = norm(x, W[p + "input_layernorm.weight"])
        q = split_heads(n.linear(h, W[p + "self_attn.q_proj.weight"]), nh, hd)
        k = split_heads(n.linear(h, W[p + "self_attn.k_proj.weight"]), nkv, hd)
        v = split_heads(n.linear(h, W[p + "self_attn.v_proj.weight"]), nkv, hd)
        q, k = norm(q, W[p + "self_attn.q_norm.weight"]), norm(k, W[p + "self_attn.k_norm.weight"])  # QK-norm, before RoPE
        q, k = n.apply_rope(q, cos, sin), n.apply_rope(k, cos, sin)
        a = n.attention(q, k, v, spec.query_scale, spec.attn_softcap, window, out, P.branch(i, "attn"))
        a = n.linear(merge_heads(a), W[p + "self_attn.o_proj.weight"])
        a = norm(a, W[p + "post_attention_layernorm.weight"])
        out[P.branch(i, "attn")] = a
        x = n.r(x + a)
        h = norm(x, W[p + "pre_feedforward_layernorm.weight"])
        g = n.activation(n.linear(h, W[p + "mlp.gate_proj.weight"]), act)
        hidden = n.r(g * n.linear(h, W[p + "mlp.up_proj.weight"]))
        capture_inner(out, P.inner(i, "mlp", "hidden"), hidden)
        m = n.linear(hidden, W[p + "mlp.down_proj.weight"])
        m = norm(m, W[p + "post_feedforward_layernorm.weight"])
        out[P.branch(i, "mlp")] = m
        x = n.r(x + m)
        out[P.layer(i)] = x
        yield  # layer i done: forward passes run side by side share each layer's weights (reference_impls.forward_many)

    x = norm(x, W["model.norm.weight"])
    out["final_norm"] = x
    logits = out.buffer("logits", (b, s, spec.vocab_size))
    head = "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"  # tied: decode with the input embedding
    yield from n.logits(x, W, head, spec.final_softcap, logits)  # one vocabulary chunk per step
    out["logits"] = logits
