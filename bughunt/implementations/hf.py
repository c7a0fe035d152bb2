"""The `hf` implementation: Hugging Face transformers on PyTorch (eager attention), capture points taken
with forward hooks on the real modules, never by editing model code. Hooks are removed after every run."""

from __future__ import annotations

import numpy as np

from bughunt.errors import BughuntError
from bughunt.implementations.base import Runner

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}


def _tensor(output):
    """A module's main output tensor (decoder layers and attention return tuples in some versions)."""
    return output[0] if isinstance(output, (tuple, list)) else output


class HFRunner(Runner):
    name = "hf"
    families = ("gemma", "gemma2", "gemma3", "llama", "mistral", "phi3", "qwen2", "qwen3")
    dtypes = ("fp32", "bf16", "fp16", "fp64")
    devices = ("cpu", "cuda")

    def __init__(self, *args, config_overrides: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.config_overrides = dict(config_overrides or {})
        self.model = None

    def _open(self) -> None:
        import torch
        import transformers

        if self.device == "cuda" and not torch.cuda.is_available():
            raise BughuntError("--device cuda was asked for, but torch sees no CUDA device here. Use --device cpu.")
        config = transformers.AutoConfig.from_pretrained(self.checkpoint)
        for key, value in self.config_overrides.items():
            setattr(config, key, value)
        dtype = getattr(torch, TORCH_DTYPES[self.dtype])
        try:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                self.checkpoint, config=config, dtype=dtype, attn_implementation="eager",
                use_safetensors=not self.allow_pickle,
            )
        except (OSError, ValueError, RuntimeError) as e:
            raise BughuntError(f"transformers could not load {self.checkpoint}: {e}") from None
        self.model.to(self.device).eval()

    def modules(self) -> dict[str, object]:
        """capture point -> (module, kind) where kind is 'pre' (input of) or 'out' (output of)."""
        base = self.model.model
        layers = base.layers
        points: dict[str, tuple[object, str]] = {"embed": (layers[0], "pre")}
        for i, layer in enumerate(layers):
            if self.branches:
                if self.spec.sandwich_norms:  # the branch output is the post-branch norm's output
                    points[f"layer.{i}.attn"] = (layer.post_attention_layernorm, "out")
                    points[f"layer.{i}.mlp"] = (layer.post_feedforward_layernorm, "out")
                else:
                    points[f"layer.{i}.attn"] = (layer.self_attn, "out")
                    points[f"layer.{i}.mlp"] = (layer.mlp, "out")
            points[f"layer.{i}"] = (layer, "out")
        points["final_norm"] = (base.norm, "out")
        return points

    def _run(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        captured: dict[str, torch.Tensor] = {}
        handles = []

        def out_hook(name):
            def hook(module, args, output):
                captured[name] = _tensor(output).detach()
            return hook

        def pre_hook(name):
            def hook(module, args, kwargs):
                x = args[0] if args else kwargs["hidden_states"]
                captured[name] = x.detach()
            return hook

        try:
            for name, (module, kind) in self.modules().items():
                if kind == "pre":
                    handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(out_hook(name)))
            ids = torch.from_numpy(tokens).to(self.device)
            with torch.no_grad():
                out = self.model(input_ids=ids, use_cache=False)
            captured["logits"] = out.logits.detach()
        finally:
            for h in handles:
                h.remove()
        return {k: v.to(torch.float32).cpu().numpy() if v.dtype != torch.float64 else v.cpu().numpy()
                for k, v in captured.items()}

    def forward_plain(self, tokens: np.ndarray) -> np.ndarray:
        """A forward pass with no hooks at all (for the capture-overhead benchmark and the hook tests)."""
        import torch

        with torch.no_grad():
            return self.model(input_ids=torch.from_numpy(tokens).to(self.device), use_cache=False).logits.float().cpu().numpy()

    def _close(self) -> None:
        self.model = None
        try:
            import torch

            if self.device == "cuda":
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def versions(self) -> dict[str, str]:
        import torch
        import transformers

        return {"torch": torch.__version__, "transformers": transformers.__version__}
