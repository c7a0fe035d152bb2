"""The quantization noise floor's weights: what a correct implementation of a quantized GGUF computes with.
Each checkpoint weight becomes dequantize(quantize(w)) in the type llama.cpp's quantizer actually chose for it (read
from the quantized GGUF: tensors whose rows do not fit a type's block fall back to another type). Where gguf-py has a
numpy quantizer for that type (f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1) the weight is quantized here, independently
of llama.cpp; where it has only a dequantizer (the k-quants), the GGUF's stored blocks are dequantized and the
converter's documented Q/K row permutation (llama) is undone. The reference then runs on these weights in float64,
so a quantized run is judged against what quantization alone explains."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from bughunt.checkpoint import MappedWeights
from bughunt.spec import Spec


def import_gguf():
    """gguf-py as vendored beside the converter (the version that wrote the files)."""
    if "gguf" not in sys.modules:
        from bughunt.errors import BughuntError
        from bughunt.implementations.gguf_convert import converter_dir, converter_info

        try:
            converter_info()
            sys.path.insert(0, str(converter_dir() / "gguf-py"))
        except BughuntError:  # no llama.cpp build here: the gguf package requirements/real.txt installs
            pass
    import gguf

    return gguf


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's LlamaModel.permute (rows regrouped so ggml's RoPE pairs adjacent features)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class QuantizedWeights(MappedWeights):
    """name -> the checkpoint weight as the quantized GGUF holds it, made on first use and kept until the forward pass
    releases it (reference_impls/_weights.py calls `release` once it has converted a tensor), so memory stays near one
    layer; the embedding and the output head, read a chunk at a time, are kept for the pass."""

    KEEP = ("model.embed_tokens.weight", "lm_head.weight")

    def release(self, array) -> None:
        for name, made in list(self._done.items()):
            if made is array and name not in self.KEEP:
                del self._done[name]
        MappedWeights.release(array)

    def __init__(self, weights: dict, spec: Spec, gguf_path: Path):
        super().__init__(weights)
        gguf = import_gguf()
        self.gguf, self.spec = gguf, spec
        reader = gguf.GGUFReader(str(gguf_path))
        self.stored = {t.name: t for t in reader.tensors}
        arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
        self.arch = arch
        arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
        self.names = gguf.get_tensor_name_map(arch_enum, spec.num_layers)
        self.how: dict[str, str] = {}  # name -> "f32" | "<type> numpy quantizer" | "<type> read back"
        self._done: dict[str, np.ndarray] = {}

    def gguf_name(self, name: str) -> str | None:
        if name == "lm_head.weight" and self.spec.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        return self.names.get_name(name, try_suffixes=(".weight", ".bias"))

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._done:
            return self._done[name]
        w = super().__getitem__(name)
        gname = self.gguf_name(name)
        tensor = self.stored.get(gname) if gname else None
        if tensor is None or tensor.tensor_type == self.gguf.GGMLQuantizationType.F32 or w.ndim < 2:
            self.how[name] = "f32"
            return w
        qtype = tensor.tensor_type
        q = self.gguf.quants
        w32 = np.asarray(w, dtype=np.float32)
        try:
            out = q.dequantize(q.quantize(w32, qtype), qtype)
            self.how[name] = f"{qtype.name} numpy quantizer"
        except NotImplementedError:
            out = q.dequantize(tensor.data, qtype).reshape(w.shape)
            if self.arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = self.spec.num_heads if name.endswith("q_proj.weight") else self.spec.num_kv_heads
                out = _unpermute(out, heads)
            self.how[name] = f"{qtype.name} read back from the GGUF"
        out = np.asarray(out, dtype=np.float32).reshape(w.shape)
        self._done[name] = out
        return out

    def emulation(self) -> dict:
        """What this floor emulated so far: weights by how they were made, activation types by weight type, and the
        weight types whose activations llama.cpp treats in a way no emulation covers yet."""
        from reference_impls._activations import VEC_DOT_TYPE

        made: dict[str, int] = {}
        for how in self.how.values():
            made[how] = made.get(how, 0) + 1
        types = {t.tensor_type.name for t in self.stored.values() if len(t.shape) >= 2} - {"F32"}
        return {"weights": made, "activations": {t: VEC_DOT_TYPE[t] for t in sorted(types) if t in VEC_DOT_TYPE},
                "not_emulated": [f"activations of {t} products (no emulation: judged on the weights alone)"
                                 for t in sorted(types) if t not in VEC_DOT_TYPE]}

    def activation_type(self, name: str) -> str | None:
        """The type llama.cpp's CPU dot product quantizes the activations to for this weight (None: not quantized)."""
        from reference_impls._activations import VEC_DOT_TYPE

        gname = self.gguf_name(name)
        tensor = self.stored.get(gname) if gname else None
        if tensor is None or len(tensor.shape) < 2:
            return None  # (the input embedding's rows are looked up, never marked: reference_impls/_weights.py)
        return VEC_DOT_TYPE.get(tensor.tensor_type.name)

    def get(self, name, default=None):
        return self[name] if name in self else default
