"""The `deepmind` implementation: Google DeepMind's `gemma` library (Flax/JAX) running Gemma, Gemma 2 and Gemma 3
text from the same HF checkpoint. The safetensors weights are converted to the library's parameter tree, the
model config is built from the Spec, and per-layer outputs come from Flax's own `capture_intermediates`.
Config fields the library cannot represent (a fixed epsilon, a fixed activation, ...) are run with the library's own
value and named in the trace's metadata (`cannot_represent`), so the report measures how much each matters."""

from __future__ import annotations

import dataclasses
import os

from pathlib import Path

import numpy as np

from bughunt.checkpoint import load_weights
from bughunt.errors import BughuntError
from bughunt.implementations.base import Runner
from bughunt import points as P


def cannot_represent(spec) -> list[str]:
    """What the library cannot represent of this checkpoint, each said as the value the library uses instead: the
    runner runs anyway with the library's own value, and the report names the cause next to the measured divergence."""
    problems = []
    if spec.activation != "gelu_tanh":
        problems.append(f"the library's MLP uses the tanh-approximate GELU; the checkpoint says {spec.activation}")
    if abs(spec.rms_eps - 1e-6) > 1e-12:
        problems.append(f"the library fixes rms_norm_eps at 1e-06; the checkpoint says {spec.rms_eps:g}")
    shared = spec.rope["full"] == spec.rope["sliding"]
    for kind, rope in spec.rope.items():
        layers = "every layer" if shared else f"{kind} layers"
        if rope.type not in ("default", "linear"):
            problems.append(f"the library has only linear RoPE scaling, so it runs {layers} unscaled; the checkpoint says "
                            f"rope_type {rope.type}")
        if rope.partial_rotary_factor != 1.0:
            problems.append(f"the library rotates every feature of each head; the checkpoint says partial_rotary_factor "
                            f"{rope.partial_rotary_factor:g} on {layers}")
    if not spec.tie_word_embeddings:
        problems.append("the library always decodes with the input embedding; the checkpoint has untied output embeddings")
    return list(dict.fromkeys(problems))


class DeepMindRunner(Runner):
    tokenizer_path = "DeepMind gemma gm.text tokenizer"  # its own tokenizer path (bughunt/probes/tokenizer_path.py)
    @classmethod
    def own_tokenizer(cls, checkpoint: Path, text: dict) -> dict:
        """The ids this library's own tokenizer path gives for `text` (bughunt/tokenizer_paths.py)."""
        spm = checkpoint / "tokenizer.model"
        if not spm.exists():
            raise BughuntError("DeepMind gemma's tokenizer reads a SentencePiece tokenizer.model, which this checkpoint lacks")
        from bughunt.implementations import _tf_stub

        _tf_stub.install()  # kauldron imports tensorflow at import time
        from gemma import gm
        from gemma.gm.text import _template

        import json

        family = json.loads((checkpoint / "config.json").read_text()).get("model_type", "")
        cls = gm.text.Gemma3Tokenizer if family.startswith("gemma3") else gm.text.Gemma2Tokenizer
        tok = cls(path=str(spm))
        from importlib.metadata import version

        what = f"DeepMind gemma {version('gemma')} {cls.__name__}.encode(add_bos=True)"
        if "chat" in text:
            parts = []
            for m in text["chat"]:
                if m["role"] == "user":
                    parts.append(_template.PROMPT.format(m["content"]))
                elif m["role"] in ("assistant", "model"):
                    parts.append(_template.ANSWER.format(m["content"]))
                else:
                    raise BughuntError(f"gm.text's chat format has user and model turns only; this chat has role {m['role']!r}")
            return {"path": what + " on turns formatted with gm.text's chat template", "rows": [[int(i) for i in tok.encode("".join(parts), add_bos=True)]]}
        return {"path": what, "rows": [[int(i) for i in tok.encode(p, add_bos=True)] for p in text["prompts"]]}

    name = "deepmind"
    install_hint = "pip install --no-deps -r requirements/jax.txt"  # how to install its stack (bughunt implementations prints it)
    library_gb, converts_from_fp32 = 1.2, True  # JAX, Flax; it converts from a float32 copy (bughunt/memory.py)
    families = ("gemma", "gemma2", "gemma3")
    dtypes = ("fp32", "bf16")
    devices = ("cpu", "cuda")
    toggle_support = {"bos": None}
    # --isolate: tried with flax.linen.intercept_methods on each Block; the model's apply is compiled and cached after
    # the first call, so an interceptor acts only on the first trace and later calls silently ignore it
    feed_refusal = "the library's forward pass is compiled and cached, so Flax's method interception cannot replace a Block's input reliably"

    def _open(self) -> None:
        self.cannot_represent = cannot_represent(self.spec)  # measured, not refused: the report names each cause
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
            arrays[P.layer(i)] = inter[f"layer_{i}"]["__call__"][0][1]  # Block returns (cache, x)
        arrays["final_norm"] = inter["final_norm"]["__call__"][0]
        arrays["logits"] = out.logits
        return {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}

    def generate(self, tokens: np.ndarray, steps: int, decode_config: dict | None = None):
        """Greedy generation through the library's own `gm.text.Sampler` (its prefill, KV cache and jitted sampler
        loop) with the ids given directly: a subclass replaces only the text-to-ids and ids-to-text steps, and the
        end tokens are ids no model emits, so exactly `steps` tokens come out. The sampler keeps no scores, so the
        per-step logits come from this runner's forward pass over the generated sequence."""
        import types

        from gemma import gm

        from bughunt.generation import Generation
        from bughunt.toggles import apply_to_tokens

        if decode_config:
            raise BughuntError(f"{self.label}: a decode-only config change is applied only on hf's generation path.")
        ids = apply_to_tokens(np.atleast_2d(np.asarray(tokens, dtype=np.int64)), self.spec, self.toggles)
        if (ids == 0).any():
            raise BughuntError(f"{self.label}: the input holds token id 0, which DeepMind's sampler treats as padding; "
                               "it cannot generate after it. Give ids without 0.")
        jnp = self.jnp

        class IdsSampler(gm.text.Sampler):
            def _tokenize_prompts(self, prompt, *, add_bos, pad_length=None):
                return jnp.asarray(prompt, jnp.int32)  # the ids as given: BOS is already where the input has it

            def _decode_state(self, state, predicted_tokens, *, has_batch_dim, return_state):
                return predicted_tokens

        class NoStop:  # a class, as the library's special tokens are (jit hashes them): no id stops generation
            EOS = -1
            END_OF_TURN = -1

        stand_in = types.SimpleNamespace(special_tokens=NoStop, FORBIDDEN_TOKENS=(), VERSION=None)
        b, p = ids.shape
        sampler = IdsSampler(model=self.model, params=self.params, tokenizer=stand_in, cache_length=p + steps + 1,
                             max_out_length=steps, pad_length=None)
        new = np.asarray(sampler.sample(ids.tolist(), max_new_tokens=steps, rng=0), dtype=np.int64)[:, :steps]
        full = np.concatenate([ids, new], axis=1)
        logits = self.run(full[:, :-1]).arrays["logits"][:, p - 1:]
        return Generation(self.label, new, np.asarray(logits, dtype=np.float32), "DeepMind gemma Sampler (greedy, KV cache)",
                          "a forward pass over the generated sequence (the sampler keeps no scores)")

    def versions(self) -> dict[str, str]:
        from importlib import metadata

        import jax

        return {"gemma": metadata.version("gemma"), "jax": jax.__version__, "flax": metadata.version("flax"),
                "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision)}
