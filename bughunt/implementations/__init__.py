"""Implementations (runners): named ways to run a checkpoint. Each is a thin runner over a real library
with one life cycle: open (load), run (token ids -> Trace), close; usable as a context manager.
Comparison code lives elsewhere and knows nothing about backends."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field

from bughunt.errors import BughuntError

DTYPES = ("fp64", "fp32", "bf16", "fp16")
# llama.cpp's quantized file types (llama_ftype in llama.h): what `llamacpp:TYPE` runs (a checkpoint quantized by
# llama.cpp's own quantizer, or a GGUF checkpoint's own file at its type) and what the reference's quantization noise
# floor emulates
QUANT_FTYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12,
                "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18,
                # made only with an importance matrix, so bughunt does not quantize to them; a GGUF file of these types runs
                "iq2_xxs": 19, "iq2_xs": 20, "q2_k_s": 21, "iq3_xs": 22, "iq3_xxs": 23, "iq1_s": 24, "iq4_nl": 25,
                "iq3_s": 26, "iq3_m": 27, "iq2_s": 28, "iq2_m": 29, "iq4_xs": 30, "iq1_m": 31, "tq1_0": 36, "tq2_0": 37}
QUANTIZED = {"llamacpp": tuple(QUANT_FTYPES), "reference": tuple(QUANT_FTYPES)}
DEVICES = ("cpu", "cuda")
# implementations that run in the main process (no worker) unless given another interpreter: the float64 reference, whose
# numpy forward steps side by side with its noise-floor passes; and which compute at float64 unless a dtype is given
MAIN_PROCESS = frozenset({"reference"})
FLOAT64_BY_DEFAULT = frozenset({"reference"})

# name -> (module:class, python modules that must be importable for it to be available, environment for its worker)
REGISTRY: dict[str, tuple[str, tuple[str, ...], dict[str, str]]] = {
    "reference": ("bughunt.implementations.reference:ReferenceRunner", ("numpy", "ml_dtypes"), {}),
    "hf": ("bughunt.implementations.hf:HFRunner", ("torch", "transformers"), {}),
    "hf+sdpa": ("bughunt.implementations.hf_variants:HFSdpaRunner", ("torch", "transformers"), {}),
    "hf+flex": ("bughunt.implementations.hf_variants:HFFlexRunner", ("torch", "transformers"), {}),
    "hf+compile": ("bughunt.implementations.hf_variants:HFCompileRunner", ("torch", "transformers"), {}),
    "mlx": ("bughunt.implementations.mlx:MLXRunner", ("mlx", "mlx_lm"), {}),
    "deepmind": ("bughunt.implementations.deepmind:DeepMindRunner", ("jax", "flax", "gemma", "kauldron"), {}),
    "keras-jax": ("bughunt.implementations.keras:KerasJaxRunner", ("keras", "keras_hub", "jax"), {"KERAS_BACKEND": "jax"}),
    "keras-torch": ("bughunt.implementations.keras:KerasTorchRunner", ("keras", "keras_hub", "torch"), {"KERAS_BACKEND": "torch"}),
    # runs in its own environment (bughunt/envs.py: OWN_ENVIRONMENTS), never in this interpreter
    "litgpt": ("bughunt.implementations.litgpt:LitGPTRunner", ("torch", "litgpt"), {}),
    "llamacpp": ("bughunt.implementations.llamacpp:LlamaCppRunner", ("llama_cpp", "torch", "transformers"), {}),
}


@dataclass(frozen=True)
class ImplChoice:
    """One implementation as the user named it: NAME[==VERSION][:DTYPE][@PYTHON]."""

    name: str
    dtype: str | None = None  # None: the run's --dtype (the reference defaults to fp64)
    python: str | None = None  # another interpreter to run it in (a worker process)
    toggles: tuple[tuple[str, str], ...] = field(default=())
    version: str | None = None  # a release of the implementation's library, run in its own environment (bughunt/envs.py)

    @property
    def label(self) -> str:
        s = self.name + (f"=={self.version}" if self.version else "") + (f":{self.dtype}" if self.dtype else "")
        if self.toggles:
            s += "[" + ",".join(f"{k}={v}" for k, v in self.toggles) + "]"
        return s + (f"@{self.python}" if self.python else "")

    @property
    def toggle_dict(self) -> dict[str, str]:
        return dict(self.toggles)

    @property
    def in_main_process(self) -> bool:
        """Whether it runs in the main process rather than in a worker (the plain reference)."""
        return self.name in MAIN_PROCESS and self.python is None

    def dtype_at(self, run_dtype: str) -> str:
        """The dtype it computes at in a run whose --dtype is `run_dtype` (the reference defaults to fp64)."""
        return self.dtype or ("fp64" if self.name in FLOAT64_BY_DEFAULT else run_dtype)

    @classmethod
    def parse(cls, text: str) -> "ImplChoice":
        import re

        rest, _, python = text.partition("@")
        m = re.fullmatch(r"([A-Za-z0-9_+-]+)(?:==([0-9][A-Za-z0-9.!+_-]*))?(?::([A-Za-z0-9_]+))?(?:\[([^\]]*)\])?", rest.strip())
        if not m:
            raise BughuntError(f"cannot read implementation '{text}'. Write NAME[==VERSION][:DTYPE][toggle=value,...][@PYTHON], "
                               "e.g. hf:bf16[gelu=exact] or hf==5.22.0.")
        name, version, dtype, toggles = m.group(1), m.group(2), m.group(3) or "", m.group(4)
        pairs: tuple[tuple[str, str], ...] = ()
        if toggles:
            from bughunt.toggles import parse_toggles

            pairs = tuple(parse_toggles([t.strip() for t in toggles.split(",") if t.strip()]).items())
        if name not in REGISTRY:
            raise BughuntError(f"unknown implementation '{name}' in '{text}'. Known: {', '.join(sorted(REGISTRY))}.")
        if dtype and dtype not in DTYPES + QUANTIZED.get(name, ()):
            raise BughuntError(f"unknown dtype '{dtype}' in '{text}'. Use one of: {', '.join(DTYPES + QUANTIZED.get(name, ()))}.")
        if version:
            from bughunt.envs import check_version

            check_version(name, version, text)
            if python:
                raise BughuntError(f"'{text}' names both a library release and an interpreter; a release brings its own "
                                   f"environment. Write {name}=={version} or {name}@{python}.")
        return cls(name=name, dtype=dtype or None, python=python or None, toggles=pairs, version=version)


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
    """Whether an implementation can run from here: the libraries it needs are importable in this interpreter, or it
    runs in an environment of its own (litgpt) and that environment exists."""
    from bughunt.envs import own_python

    return all(importlib.util.find_spec(m) is not None for m in REGISTRY[name][1]) or own_python(name) is not None


def runner_class(name: str):
    if name not in REGISTRY:
        raise BughuntError(f"unknown implementation '{name}'. Known: {', '.join(sorted(REGISTRY))}.")
    if not available(name):
        from bughunt.envs import OWN_ENVIRONMENTS, require_own_python

        if name in OWN_ENVIRONMENTS:
            require_own_python(name)  # refuses, naming the command that creates its environment
        missing = [m for m in REGISTRY[name][1] if importlib.util.find_spec(m) is None]
        raise BughuntError(f"implementation '{name}' needs {', '.join(missing)}, which is not installed. See the README's install section.")
    module, _, cls = REGISTRY[name][0].partition(":")
    return getattr(importlib.import_module(module), cls)


def runner_class_unchecked(name: str):
    """The runner class even when its libraries are missing (runner modules import their heavy library lazily): what a
    runner says about itself (install hint, tokenizer path, memory overhead) without running it."""
    module, _, cls = REGISTRY[name][0].partition(":")
    return getattr(importlib.import_module(module), cls)


def supports(name: str, family: str) -> bool:
    """Whether an installed implementation runs this family (without loading its heavy library)."""
    return available(name) and family in runner_class(name).families
