"""The `keras-jax` and `keras-torch` implementations: keras-hub backbones loaded from the same HF checkpoint
directory by keras-hub's own converter (`Backbone.from_preset(<local dir>)`), per-layer outputs captured with a
functional probe over the backbone's transformer layers. Keras fixes its backend at first import, so each
backend runs in its own worker process (KERAS_BACKEND is set by the worker pool)."""

from __future__ import annotations

import os

from pathlib import Path

import numpy as np

from bughunt.errors import BughuntError
from bughunt.implementations.base import Runner
from bughunt import points as P

KERAS_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class KerasRunner(Runner):
    install_hint = "pip install --no-deps -r requirements/keras.txt"  # how to install its stack (bughunt implementations prints it)
    library_gb, converts_from_fp32 = 1.2, True  # Keras on JAX; it converts from a float32 copy (bughunt/memory.py)
    tokenizer_path = "keras-hub CausalLMPreprocessor"  # its own tokenizer path (bughunt/probes/tokenizer_path.py)
    @classmethod
    def own_tokenizer(cls, checkpoint: Path, text: dict) -> dict:
        """The ids this library's own tokenizer path gives for `text` (bughunt/tokenizer_paths.py)."""
        import numpy as np

        try:
            import keras_hub
        except ImportError as e:
            raise BughuntError(f"keras-hub cannot be imported in this process ({e}); its tokenizer path runs in the keras "
                               "worker, where KERAS_BACKEND is set before keras is imported") from None

        try:
            pre = keras_hub.models.CausalLMPreprocessor.from_preset(str(checkpoint))
        except Exception as e:  # the library cannot read this checkpoint's tokenizer: a skip with its reason
            raise BughuntError(f"keras-hub cannot build a preprocessor for this checkpoint: {type(e).__name__}: {str(e)[:300]}") from None
        what = f"keras-hub {keras_hub.__version__} {type(pre).__name__}.generate_preprocess"
        prompts = [text["rendered"]] if "chat" in text else text["prompts"]
        rows = []
        for p in prompts:
            pre.sequence_length = 2 * len(p.encode("utf-8")) + 8  # room for every byte and the start/end tokens
            out = pre.generate_preprocess([p])
            ids, mask = np.asarray(out["token_ids"])[0], np.asarray(out["padding_mask"])[0].astype(bool)
            rows.append([int(i) for i in ids[mask]])
        return {"path": what + (" on the text the checkpoint's chat template renders" if "chat" in text else ""), "rows": rows}

    backend = "jax"
    # keras-hub 0.32 converts these HF model types; phi3 has no converter (Phi3Backbone exists, no HF loader).
    families = ("gemma", "gemma2", "gemma3", "llama", "mistral", "qwen2", "qwen3")
    dtypes = ("fp32", "bf16", "fp16")
    devices = ("cpu", "cuda")
    toggle_support = {"bos": None}
    feed_refusal = "the probe runs keras-hub's backbone as one functional graph; feeding a layer would mean rebuilding the model"

    def _open(self) -> None:
        current = os.environ.get("KERAS_BACKEND")
        if current != self.backend:
            raise BughuntError(f"{self.name} needs KERAS_BACKEND={self.backend} before keras is imported (found {current!r}); "
                               "run it in a worker process (the default; do not pass --in-process).")
        import keras
        import keras_hub

        if keras.config.backend() != self.backend:
            raise BughuntError(f"keras is already imported with backend {keras.config.backend()} in this process; {self.name} needs {self.backend}.")
        if self.device == "cuda" and not self._has_gpu():
            raise BughuntError(f"--device cuda was asked for, but the {self.backend} backend sees no GPU here. Use --device cpu.")
        from keras_hub.src.utils.transformers.safetensor_utils import SafetensorLoader

        # Which checkpoint tensor keras-hub's converter put into which variable (for the weight check): recorded by
        # wrapping the loader's port_weight for the duration of the load, never by reading the converter.
        self._ported: dict[str, tuple[str, object]] = {}
        original = SafetensorLoader.port_weight

        def recording(loader, keras_variable, hf_weight_key, hook_fn=None):
            result = original(loader, keras_variable, hf_weight_key, hook_fn)
            # the name in the file: some converters name tensors without the "model." prefix and the loader finds it
            names = loader.safetensor_config["weight_map"] if loader.safetensor_config else next(iter(loader.safetensor_files.values()))
            self._ported[keras_variable.path] = (loader.get_prefixed_key(hf_weight_key, names), keras_variable)
            return result

        SafetensorLoader.port_weight = recording
        try:
            self.backbone = keras_hub.models.Backbone.from_preset(str(self.checkpoint), dtype=KERAS_DTYPES[self.dtype])
        except (ValueError, KeyError, OSError) as e:
            raise BughuntError(f"keras-hub could not convert {self.checkpoint}: {e}") from None
        finally:
            SafetensorLoader.port_weight = original
        bb = self.backbone
        layers = bb.transformer_layers
        first_in = layers[0].input
        first_in = first_in[0] if isinstance(first_in, (list, tuple)) else first_in
        self.probe = keras.Model(bb.inputs, [first_in] + [layer.output[0] if isinstance(layer.output, (list, tuple)) else layer.output
                                                          for layer in layers] + [bb.output])

    def _has_gpu(self) -> bool:
        if self.backend == "jax":
            import jax

            return any(d.platform == "gpu" for d in jax.devices())
        import torch

        return torch.cuda.is_available()

    def _run(self, tokens: np.ndarray, out=None) -> dict[str, np.ndarray]:
        from keras import ops

        inputs = {"token_ids": tokens.astype("int32"), "padding_mask": np.ones_like(tokens, dtype="int32")}
        outs = self.probe(inputs)
        embed, *layers, final = outs
        logits = self.backbone.token_embedding(final, reverse=True)  # tied or untied head; applies Gemma 2's final soft-cap
        arrays = {"embed": embed}
        arrays.update({P.layer(i): x for i, x in enumerate(layers)})
        arrays["final_norm"] = final
        arrays["logits"] = logits
        return {k: np.asarray(ops.convert_to_numpy(ops.cast(v, "float32"))) for k, v in arrays.items()}

    exposes_weights = True

    def loaded_weights(self):
        """Each variable keras-hub's converter filled, back in the checkpoint's [out, in] layout by the documented
        semantics of the layer holding it (not by the converter's own hook): an EinsumDense kernel is transposed and
        reshaped by its equation (e.g. "btd,ndh->btnh": [heads, D, head_dim] -> [heads * head_dim, D]), a Dense kernel
        [in, out] is transposed, a ReversibleEmbedding's reverse_embeddings [D, vocab] is transposed, biases are
        flattened in output order, norm scales and embeddings are as stored."""
        from keras import ops

        layouts = _variable_layouts(self.backbone)
        for path, (name, variable) in self._ported.items():
            value = np.asarray(ops.convert_to_numpy(ops.cast(variable.value, "float32")))
            yield name, _to_checkpoint_layout(value, layouts.get(path))


    def generate(self, tokens: np.ndarray, steps: int, decode_config: dict | None = None):
        """Greedy generation through keras-hub's own `CausalLM.generate` (its cache and sampler loop, compiled as the
        library compiles it), on the same backbone, with no preprocessor: the ids go in padded to prompt + steps and
        generation never stops early. keras-hub's generate returns no scores, so the per-step logits come from this
        runner's forward pass over the generated sequence (teacher-forced on the tokens it chose)."""
        import keras_hub

        from bughunt.generation import Generation
        from bughunt.toggles import apply_to_tokens

        if decode_config:
            raise BughuntError(f"{self.label}: a decode-only config change is applied only on hf's generation path.")
        ids = apply_to_tokens(np.atleast_2d(np.asarray(tokens, dtype=np.int64)), self.spec, self.toggles)
        cls = _causal_lm_class(keras_hub, type(self.backbone))
        lm = cls(backbone=self.backbone, preprocessor=None)
        lm.compile(sampler="greedy")
        b, p = ids.shape
        padded = np.concatenate([ids, np.zeros((b, steps), dtype=np.int64)], axis=1).astype("int32")
        mask = np.concatenate([np.ones((b, p), dtype=bool), np.zeros((b, steps), dtype=bool)], axis=1)
        out = lm.generate({"token_ids": padded, "padding_mask": mask}, stop_token_ids=None)
        full = np.asarray(out["token_ids"], dtype=np.int64)
        new = full[:, p:]
        logits = self.run(full[:, :-1]).arrays["logits"][:, p - 1:]
        return Generation(self.label, new, np.asarray(logits, dtype=np.float32), f"keras-hub {cls.__name__}.generate (greedy sampler, cache)",
                          "a forward pass over the generated sequence (keras-hub's generate returns no scores)")

    def versions(self) -> dict[str, str]:
        import keras
        import keras_hub

        out = {"keras": keras.__version__, "keras_hub": keras_hub.__version__, "backend": self.backend}
        if self.backend == "jax":
            import jax

            out["jax"] = jax.__version__
        else:
            import torch

            out["torch"] = torch.__version__
        return out


def _variable_layouts(backbone) -> dict[str, tuple[str, str | None]]:
    """variable path -> (kind, EinsumDense equation) for the variables whose layout differs from HF's."""
    import keras

    out: dict[str, tuple[str, str | None]] = {}
    for layer in backbone._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.EinsumDense):
            out[layer.kernel.path] = ("einsum", layer.equation)
            if getattr(layer, "bias", None) is not None:
                out[layer.bias.path] = ("bias", None)
        elif isinstance(layer, keras.layers.Dense):
            out[layer.kernel.path] = ("dense", None)
        elif isinstance(layer, keras.layers.Embedding) and getattr(layer, "reverse_embeddings", None) is not None:
            # a ReversibleEmbedding (keras' own or keras-hub's): logits = x @ reverse_embeddings [D, vocab]
            out[layer.reverse_embeddings.path] = ("reverse_embeddings", None)
    return out


def _to_checkpoint_layout(value: np.ndarray, layout: tuple[str, str | None] | None) -> np.ndarray:
    """A keras variable in HF's layout: nn.Linear [out_features, in_features], biases and vectors flat."""
    if layout is None:
        return value
    kind, equation = layout
    if kind in ("dense", "reverse_embeddings"):
        return value.T
    if kind == "bias":
        return value.reshape(-1)
    inputs, _, output = equation.replace(".", "").partition("->")
    source, kernel = inputs.split(",")
    produced = [ch for ch in output if ch in kernel]  # HF's out_features, in the output's order
    contracted = [ch for ch in source if ch in kernel and ch not in output]  # HF's in_features, in the input's order
    moved = value.transpose([kernel.index(ch) for ch in produced + contracted])
    rows = int(np.prod([value.shape[kernel.index(ch)] for ch in produced]))
    return moved.reshape(rows, -1)


def _causal_lm_class(keras_hub, backbone_cls):
    """The keras-hub CausalLM task class built on this backbone class."""
    todo, seen = [keras_hub.models.CausalLM], []
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    match = [c for c in seen if getattr(c, "backbone_cls", None) is backbone_cls]
    if not match:
        raise BughuntError(f"keras-hub has no CausalLM task for {backbone_cls.__name__}, so it cannot generate.")
    return match[0]


class KerasJaxRunner(KerasRunner):
    name = "keras-jax"
    backend = "jax"


class KerasTorchRunner(KerasRunner):
    name = "keras-torch"
    library_gb = 1.0  # Keras on torch (bughunt/memory.py)
    backend = "torch"
