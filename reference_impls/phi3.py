"""Phi-3 forward pass in float64, from the Phi-3 technical report (Abdin et al. 2024) and config.json.

Llama-like decoder with fused weights as stored: qkv_proj holds [q; k; v] stacked on the output axis,
gate_up_proj holds [gate; up]. Partial rotary (partial_rotary_factor) rotates only the first features of
each head; sliding_window applies to every layer when set.
"""

from __future__ import annotations

import numpy as np

from bughunt import points as P
from reference_impls._capture import capture_inner, layer_input
from reference_impls._numerics import Policy, merge_heads, resolve, split_heads
from reference_impls._weights import stream_weights


def forward(weights: dict, spec, tokens: np.ndarray, policy: Policy, out):
    n, act, norm_dtype = resolve(spec, policy, default_norm_dtype="mixed")
    W = stream_weights(n, weights)  # each tensor read from disk, in float64, only while its layer runs
    norm = lambda x, w: n.rms_norm(x, w, spec.rms_eps, "w", norm_dtype)  # noqa: E731
    b, s = tokens.shape
    nh, nkv, hd, inter = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.intermediate_size

    x = W.rows("model.embed_tokens.weight", tokens)
    out["embed"] = x

    rope = spec.rope["full"]
    cos, sin = n.rope_cos_sin(np.arange(s), rope, int(hd * rope.partial_rotary_factor), spec)

    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        x = layer_input(out, i, x, n)  # --isolate: the reference's input to this layer
        window = spec.sliding_window if spec.layer_types[i] == "sliding" else None
        h = norm(x, W[p + "input_layernorm.weight"])
        qkv = n.linear(h, W[p + "self_attn.qkv_proj.weight"])
        q = split_heads(qkv[..., : nh * hd], nh, hd)
        k = split_heads(qkv[..., nh * hd: (nh + nkv) * hd], nkv, hd)
        v = split_heads(qkv[..., (nh + nkv) * hd:], nkv, hd)
        q, k = n.apply_rope(q, cos, sin), n.apply_rope(k, cos, sin)
        a = n.attention(q, k, v, spec.query_scale, spec.attn_softcap, window, out, P.branch(i, "attn"))
        a = n.linear(merge_heads(a), W[p + "self_attn.o_proj.weight"])
        out[P.branch(i, "attn")] = a
        x = n.r(x + a)
        h = norm(x, W[p + "post_attention_layernorm.weight"])
        gate_up = n.linear(h, W[p + "mlp.gate_up_proj.weight"])
        g, u = gate_up[..., :inter], gate_up[..., inter:]
        hidden = n.r(u * n.activation(g, act))
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
