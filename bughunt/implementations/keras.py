"""The `keras-jax` and `keras-torch` implementations: keras-hub backbones loaded from the same HF checkpoint
directory by keras-hub's own converter (`Backbone.from_preset(<local dir>)`), per-layer outputs captured with a
functional probe over the backbone's transformer layers. Keras fixes its backend at first import, so each
backend runs in its own worker process (KERAS_BACKEND is set by the worker pool)."""

from __future__ import annotations

import os

import numpy as np

from bughunt.errors import BughuntError
from bughunt.implementations.base import Runner

KERAS_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class KerasRunner(Runner):
    backend = "jax"
    # keras-hub 0.32 converts these HF model types; phi3 has no converter (Phi3Backbone exists, no HF loader).
    families = ("gemma", "gemma2", "gemma3", "llama", "mistral", "qwen2", "qwen3")
    dtypes = ("fp32", "bf16", "fp16")
    devices = ("cpu", "cuda")
    toggle_support = {"bos": None}

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
        try:
            self.backbone = keras_hub.models.Backbone.from_preset(str(self.checkpoint), dtype=KERAS_DTYPES[self.dtype])
        except (ValueError, KeyError, OSError) as e:
            raise BughuntError(f"keras-hub could not convert {self.checkpoint}: {e}") from None
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
        arrays.update({f"layer.{i}": x for i, x in enumerate(layers)})
        arrays["final_norm"] = final
        arrays["logits"] = logits
        return {k: np.asarray(ops.convert_to_numpy(ops.cast(v, "float32"))) for k, v in arrays.items()}

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
    backend = "torch"
