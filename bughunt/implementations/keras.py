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


class KerasJaxRunner(KerasRunner):
    name = "keras-jax"
    backend = "jax"


class KerasTorchRunner(KerasRunner):
    name = "keras-torch"
    backend = "torch"
