"""Tiny HF checkpoints -> keras-hub backbones (from a LOCAL HF dir), compared with HF fp32.

Run one backend per process (Keras fixes its backend at first import):
    KERAS_BACKEND=jax   /tmp/inv4/venv/bin/python /tmp/inv4/keras_tiny.py
    KERAS_BACKEND=torch /tmp/inv4/venv/bin/python /tmp/inv4/keras_tiny.py
Families: gemma, gemma2, gemma3 (text), llama, mistral, qwen2, phi3 (phi3 has no HF converter
in keras-hub -> reported as unsupported). Only config.json + model.safetensors are written;
no tokenizer files are needed when loading the Backbone only.
"""
import os
import sys
import tempfile

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers as tr  # noqa: E402

import keras  # noqa: E402
import keras_hub  # noqa: E402

if keras.backend.backend() == "jax":
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def make_hf(family):
    c = dict(COMMON)
    if family == "gemma":
        cfg, cls = tr.GemmaConfig(**c, head_dim=16), tr.GemmaForCausalLM
    elif family == "gemma2":
        # keras-hub hard-codes sliding window on even layers (HF default layer_types agree);
        # keras-hub only knows query_pre_attn_scalar in {head_dim, hidden/num_heads}
        cfg, cls = tr.Gemma2Config(**c, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0), tr.Gemma2ForCausalLM
    elif family == "gemma3":
        # keras-hub Gemma3Backbone hard-codes the 5 local : 1 global pattern (i % 6 < 5) and
        # rope wavelengths 10k (local) / 1M (global): use 6 layers with HF's default layer_types
        c["num_hidden_layers"] = 6
        cfg = tr.Gemma3TextConfig(**c, head_dim=16, sliding_window=4, query_pre_attn_scalar=16)
        cls = tr.Gemma3ForCausalLM
    elif family == "llama":
        cfg, cls = tr.LlamaConfig(**c), tr.LlamaForCausalLM
    elif family == "mistral":
        cfg, cls = tr.MistralConfig(**c, sliding_window=4), tr.MistralForCausalLM
    elif family == "qwen2":
        cfg, cls = tr.Qwen2Config(**c, use_sliding_window=False), tr.Qwen2ForCausalLM
    elif family == "phi3":
        cfg, cls = tr.Phi3Config(**c, pad_token_id=0), tr.Phi3ForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = cls(cfg).eval().float()
    g = torch.Generator().manual_seed(1)  # O(1) attention logits, random norm weights
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.copy_((0.0 if family.startswith("gemma") else 1.0) + torch.randn(p.shape, generator=g) * 0.3)
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed" in n else 1.5 / p.shape[1] ** 0.5))
            else:  # biases (qwen2)
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return hf


def hf_forward(hf, ids):
    outs = []
    hooks = [lyr.register_forward_hook(lambda m, i, o: outs.append((o[0] if isinstance(o, tuple) else o).detach()))
             for lyr in hf.model.layers]
    with torch.no_grad():
        logits = hf(torch.as_tensor(ids)).logits
    for h in hooks:
        h.remove()
    return logits.numpy(), [o.numpy() for o in outs]


def load_keras_backbone(path):
    """Local HF dir (config.json + model.safetensors) -> keras-hub Backbone. No tokenizer needed."""
    return keras_hub.models.Backbone.from_preset(path, dtype="float32")


def keras_forward(backbone, ids):
    """Per-layer outputs via a functional sub-model over backbone.transformer_layers."""
    probe = keras.Model(backbone.inputs, [l.output for l in backbone.transformer_layers] + [backbone.output])
    inputs = {"token_ids": ids.astype("int32"), "padding_mask": np.ones_like(ids, dtype="int32")}
    *layers, final = probe(inputs)
    # tied or untied ReversibleEmbedding; for gemma2 it also applies final_logit_soft_cap itself
    logits = backbone.token_embedding(final, reverse=True)
    to_np = lambda t: np.asarray(keras.ops.convert_to_numpy(t))  # noqa: E731
    return to_np(logits), [to_np(x) for x in layers]


def run(family):
    hf = make_hf(family)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)  # config.json + model.safetensors only
        try:
            bb = load_keras_backbone(d)
        except Exception as e:  # noqa: BLE001
            print(f"{family:8s} {keras.backend.backend():5s}: NOT LOADABLE: {type(e).__name__}: {str(e)[:150]}")
            return
    ids = np.array([[2, 17, 0, 99, 255, 3, 42, 7]])
    k_logits, k_layers = keras_forward(bb, ids)
    h_logits, h_layers = hf_forward(hf, ids)
    d = ["%.1e" % np.abs(a - b).max() for a, b in zip(k_layers, h_layers)]
    print(f"{family:8s} {keras.backend.backend():5s}: {type(bb).__name__:16s} logits max|diff|="
          f"{np.abs(k_logits - h_logits).max():.2e} (max|logit| {np.abs(h_logits).max():.0f}); per-layer {d}")
    if family == "mistral":  # keras-hub's mistral converter casts every weight to float16
        with torch.no_grad():
            for p in hf.parameters():
                p.copy_(p.half().float())
        h_logits, h_layers = hf_forward(hf, ids)
        d = ["%.1e" % np.abs(a - b).max() for a, b in zip(k_layers, h_layers)]
        print(f"{'':8s} {'':5s}  vs HF with fp16-rounded weights: logits max|diff|="
              f"{np.abs(k_logits - h_logits).max():.2e}; per-layer {d}")


if __name__ == "__main__":
    for fam in (sys.argv[1:] or ["gemma", "gemma2", "gemma3", "llama", "mistral", "qwen2", "phi3"]):
        run(fam)
