"""Implementations (runners): named ways to run a checkpoint. Each is a thin runner over a real library
with one life cycle: open (load), run (token ids -> Trace), close; usable as a context manager.
Comparison code lives elsewhere and knows nothing about backends."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field

from bughunt.errors import BughuntError

DTYPES = ("fp64", "fp32", "bf16", "fp16")
# weight types an implementation makes with its own quantizer (the reference's: its quantization noise floor)
QUANTIZED = {"llamacpp": ("q8_0", "q4_k_m"), "reference": ("q8_0", "q4_k_m")}
DEVICES = ("cpu", "cuda")

# name -> (module:class, python modules that must be importable for it to be available, environment for its worker)
REGISTRY: dict[str, tuple[str, tuple[str, ...], dict[str, str]]] = {
    "reference": ("bughunt.implementations.reference:ReferenceRunner", ("numpy", "ml_dtypes"), {}),
    "hf": ("bughunt.implementations.hf:HFRunner", ("torch", "transformers"), {}),
    "deepmind": ("bughunt.implementations.deepmind:DeepMindRunner", ("jax", "flax", "gemma", "kauldron"), {}),
    "keras-jax": ("bughunt.implementations.keras:KerasJaxRunner", ("keras", "keras_hub", "jax"), {"KERAS_BACKEND": "jax"}),
    "keras-torch": ("bughunt.implementations.keras:KerasTorchRunner", ("keras", "keras_hub", "torch"), {"KERAS_BACKEND": "torch"}),
    "llamacpp": ("bughunt.implementations.llamacpp:LlamaCppRunner", ("llama_cpp", "torch", "transformers"), {}),
}


@dataclass(frozen=True)
class ImplChoice:
    """One implementation as the user named it: NAME[:DTYPE][@PYTHON]."""

    name: str
    dtype: str | None = None  # None: the run's --dtype (the reference defaults to fp64)
    python: str | None = None  # another interpreter to run it in (a worker process)
    toggles: tuple[tuple[str, str], ...] = field(default=())

    @property
    def label(self) -> str:
        s = self.name + (f":{self.dtype}" if self.dtype else "")
        if self.toggles:
            s += "[" + ",".join(f"{k}={v}" for k, v in self.toggles) + "]"
        return s + (f"@{self.python}" if self.python else "")

    @property
    def toggle_dict(self) -> dict[str, str]:
        return dict(self.toggles)

    @classmethod
    def parse(cls, text: str) -> "ImplChoice":
        import re

        rest, _, python = text.partition("@")
        m = re.fullmatch(r"([A-Za-z0-9_-]+)(?::([A-Za-z0-9_]+))?(?:\[([^\]]*)\])?", rest.strip())
        if not m:
            raise BughuntError(f"cannot read implementation '{text}'. Write NAME[:DTYPE][toggle=value,...][@PYTHON], e.g. hf:bf16[gelu=exact].")
        name, dtype, toggles = m.group(1), m.group(2) or "", m.group(3)
        pairs: tuple[tuple[str, str], ...] = ()
        if toggles:
            from bughunt.toggles import parse_toggles

            pairs = tuple(parse_toggles([t.strip() for t in toggles.split(",") if t.strip()]).items())
        if name not in REGISTRY:
            raise BughuntError(f"unknown implementation '{name}' in '{text}'. Known: {', '.join(sorted(REGISTRY))}.")
        if dtype and dtype not in DTYPES + QUANTIZED.get(name, ()):
            raise BughuntError(f"unknown dtype '{dtype}' in '{text}'. Use one of: {', '.join(DTYPES + QUANTIZED.get(name, ()))}.")
        return cls(name=name, dtype=dtype or None, python=python or None, toggles=pairs)


def require_device(device: str, where: str = "--device") -> None:
    """Refuse a device that is unknown or absent on this machine, before anything runs. torch is asked only when
    cuda is, so a CPU run never pays for the check."""
    if device not in DEVICES:
        raise BughuntError(f"{where}: unknown device '{device}'. Use one of: {', '.join(DEVICES)}.")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            fix = "--device cpu" if where == "--device" else 'devices = ["cpu"]'
            raise BughuntError(f"{where} cuda was asked for, but torch sees no CUDA device on this machine. Ask for {fix}, "
                               "or run on a machine with a GPU.")


def available(name: str) -> bool:
    """Whether the libraries an implementation needs are importable here."""
    return all(importlib.util.find_spec(m) is not None for m in REGISTRY[name][1])


def runner_class(name: str):
    if name not in REGISTRY:
        raise BughuntError(f"unknown implementation '{name}'. Known: {', '.join(sorted(REGISTRY))}.")
    if not available(name):
        missing = [m for m in REGISTRY[name][1] if importlib.util.find_spec(m) is None]
        raise BughuntError(f"implementation '{name}' needs {', '.join(missing)}, which is not installed. See the README's install section.")
    module, _, cls = REGISTRY[name][0].partition(":")
    return getattr(importlib.import_module(module), cls)


def supports(name: str, family: str) -> bool:
    """Whether an installed implementation runs this family (without loading its heavy library)."""
    return available(name) and family in runner_class(name).families
