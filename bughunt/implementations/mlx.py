"""The `mlx` implementation: Apple's MLX through mlx-lm, which loads the same HF checkpoint directory with its own
model files (`mlx_lm.utils.load_model`). It runs on the CPU backend on Linux (`mlx[cpu]`) as on a Mac.

MLX modules have no forward hooks, so capture wraps `__call__` of the block, attention, MLP and norm classes of the
loaded model for the runner's life: the wrapper calls the real method and keeps the output of the instances that are
capture points. The wrappers are undone on close; the model code is never edited."""

from __future__ import annotations

import numpy as np

from bughunt.errors import BughuntError
from bughunt.implementations.base import Runner, decoder_points

MLX_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class MLXRunner(Runner):
    name = "mlx"
    install_hint = "pip install --no-deps -r requirements/mlx.txt"  # how to install its stack (bughunt implementations prints it)
    # mlx-lm 0.32 model files for these HF model types (mistral is read by its llama file)
    families = ("gemma", "gemma2", "gemma3", "llama", "mistral", "phi3", "qwen2", "qwen3")
    dtypes = ("fp32", "bf16", "fp16")
    devices = ("cpu",)
    toggle_support = {"bos": None}

    def _open(self) -> None:
        import mlx.core as mx
        from mlx_lm.utils import load_model

        mx.set_default_device(mx.cpu)
        try:
            self.model, _ = load_model(self.checkpoint)
        except (ValueError, FileNotFoundError) as e:
            raise BughuntError(f"mlx-lm could not load {self.checkpoint}: {e}") from None
        pattern = getattr(getattr(self.model, "args", None), "sliding_window_pattern", None)
        if self.spec.family == "gemma3" and pattern and self.spec.num_layers < pattern:
            raise BughuntError(f"mlx-lm's gemma3 model cannot run this {self.spec.num_layers}-layer checkpoint: it ignores "
                               f"layer_types and hard-codes a global layer every {pattern} layers, so it needs at least {pattern}.")
        self.model.set_dtype(getattr(mx, MLX_DTYPES[self.dtype]))
        self._captured: dict[str, object] = {}
        self._points = self._capture_points()
        self._undo = []
        by_id = {}
        for name, (module, kind) in self._points.items():
            by_id.setdefault(id(module), []).append((name, kind))
        captured = self._captured
        for cls in {type(module) for module, _ in self._points.values()}:
            original = cls.__call__

            def call(module, *args, _original=original, **kwargs):
                for name, kind in by_id.get(id(module), ()):
                    if kind == "pre":
                        captured[name] = args[0] if args else kwargs["x"]
                out = _original(module, *args, **kwargs)
                for name, kind in by_id.get(id(module), ()):
                    if kind == "out":
                        captured[name] = out[0] if isinstance(out, tuple) else out
                return out

            cls.__call__ = call
            self._undo.append(lambda cls=cls, original=original: setattr(cls, "__call__", original))

    def _capture_points(self) -> dict[str, tuple[object, str]]:
        return decoder_points(self.model.model, self.spec, self.branches)

    def _run(self, tokens: np.ndarray, out) -> None:
        import mlx.core as mx

        self._captured.clear()
        logits = self.model(mx.array(tokens))
        mx.eval(logits, *self._captured.values())
        for name in self._points:
            if name not in self._captured:
                raise RuntimeError(f"mlx-lm's model never called the module of capture point {name}")
            out[name] = np.array(self._captured[name].astype(mx.float32))
        self._captured.clear()
        out["logits"] = np.array(logits.astype(mx.float32))

    def _close(self) -> None:
        while getattr(self, "_undo", None):
            self._undo.pop()()
        self.model = None

    def versions(self) -> dict[str, str]:
        import importlib.metadata

        return {"mlx": importlib.metadata.version("mlx"), "mlx-lm": importlib.metadata.version("mlx-lm")}
