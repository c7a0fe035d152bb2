"""Llama-style forward pass in float64: Llama 2/3 (Touvron et al. 2023), Mistral 7B (Jiang et al. 2023),
Qwen 2 and Qwen 3 (Qwen Team 2024/2025), from their papers and config.json.

Pre-norm RMSNorm with a plain w scale, RoPE, grouped-query attention, SwiGLU MLP. The variants differ in
explicit, spec-driven ways: Mistral's sliding window (sliding_window), Qwen 2's q/k/v biases
(attention_bias), Qwen 3's per-head QK-norm (qk_norm), untied output embeddings by default.
"""

from __future__ import annotations

import numpy as np

from bughunt import points as P
from reference_impls._capture import capture_inner, layer_input
from reference_impls._numerics import Policy, merge_heads, resolve, split_heads
from reference_impls._weights import stream_weights


def forward(weights: dict, spec, tokens: np.ndarray, policy: Policy, out):
    n, act, norm_dtype = resolve(spec, policy, default_norm_dtype="mixed")  # HF Llama: normalise in fp32, x.to(dtype) * w
    W = stream_weights(n, weights)  # each tensor read from disk, in float64, only while its layer runs
    norm = lambda x, w: n.rms_norm(x, w, spec.rms_eps, "w", norm_dtype)  # noqa: E731
    b, s = tokens.shape
    nh, nkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    bias = (lambda name: W[name]) if spec.attention_bias else (lambda name: None)

    x = W.rows("model.embed_tokens.weight", tokens)  # no embedding scale in this family
    out["embed"] = x

    rope = spec.rope["full"]
    cos, sin = n.rope_cos_sin(np.arange(s), rope, int(hd * rope.partial_rotary_factor), spec)

    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        x = layer_input(out, i, x, n)  # --isolate: the reference's input to this layer
        window = spec.sliding_window if spec.layer_types[i] == "sliding" else None
        h = norm(x, W[p + "input_layernorm.weight"])
        q = split_heads(n.linear(h, W[p + "self_attn.q_proj.weight"], bias(p + "self_attn.q_proj.bias")), nh, hd)
        k = split_heads(n.linear(h, W[p + "self_attn.k_proj.weight"], bias(p + "self_attn.k_proj.bias")), nkv, hd)
        v = split_heads(n.linear(h, W[p + "self_attn.v_proj.weight"], bias(p + "self_attn.v_proj.bias")), nkv, hd)
        if spec.qk_norm:  # Qwen 3: RMSNorm over head_dim on q and k, before RoPE
            q, k = norm(q, W[p + "self_attn.q_norm.weight"]), norm(k, W[p + "self_attn.k_norm.weight"])
        q, k = n.apply_rope(q, cos, sin), n.apply_rope(k, cos, sin)
        a = n.attention(q, k, v, spec.query_scale, spec.attn_softcap, window, out, P.branch(i, "attn"))
        a = n.linear(merge_heads(a), W[p + "self_attn.o_proj.weight"])
        out[P.branch(i, "attn")] = a
        x = n.r(x + a)
        # SwiGLU (Shazeer 2020): down(silu(gate(h)) * up(h)).
        h = norm(x, W[p + "post_attention_layernorm.weight"])
        g = n.activation(n.linear(h, W[p + "mlp.gate_proj.weight"]), act)
        hidden = n.r(g * n.linear(h, W[p + "mlp.up_proj.weight"]))
        capture_inner(out, P.inner(i, "mlp", "hidden"), hidden)
        m = n.linear(hidden, W[p + "mlp.down_proj.weight"])
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
