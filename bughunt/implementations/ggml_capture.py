"""Capture from llama.cpp's compute graph through its eval callback (`llama_context_params.cb_eval`), the way
llama.cpp's own `llama-eval-callback` does: the scheduler asks about each graph node in order (`ask`), computes up to
the nodes we want, and hands each one back (`ask` false), when we copy it out with `ggml_backend_tensor_get`.

Nodes are matched by the names llama.cpp's graph builders give them (`l_out-3`, `attn_post_norm-0`, ...) and by
graph order: a name without a layer index (Gemma 2's `ffn_post_norm`) belongs to the layer whose `l_out` comes next,
and a branch the builder leaves unnamed is the matrix product with that layer's output weight
(`blk.{i}.attn_output.weight`)."""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass, field

import numpy as np
from bughunt import points as P

_MAX_DIMS, _MAX_OP_PARAMS, _MAX_SRC = 4, 64, 10  # ggml.h: GGML_MAX_DIMS, GGML_MAX_OP_PARAMS, GGML_MAX_SRC


class GgmlTensor(ctypes.Structure):
    """The leading fields of `struct ggml_tensor` (ggml.h), as far as the sources."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * _MAX_DIMS),
                ("nb", ctypes.c_size_t * _MAX_DIMS), ("op", ctypes.c_int),
                ("op_params", ctypes.c_int32 * (_MAX_OP_PARAMS // 4)), ("flags", ctypes.c_int32),
                ("src", ctypes.c_void_p * _MAX_SRC)]


_NUMPY = {0: np.float32, 1: np.float16, 30: "bfloat16"}  # ggml_type: F32, F16, BF16


class Ggml:
    """The few ggml functions the capture needs, from the libggml-base that llama_cpp loaded."""

    def __init__(self):
        import pathlib

        import llama_cpp
        from llama_cpp._ctypes_extensions import load_shared_library

        lib = load_shared_library("ggml-base", pathlib.Path(llama_cpp.__file__).parent / "lib")
        p = ctypes.c_void_p
        for name, args, res in (("ggml_get_name", [p], ctypes.c_char_p), ("ggml_nbytes", [p], ctypes.c_size_t),
                                ("ggml_backend_tensor_get", [p, p, ctypes.c_size_t, ctypes.c_size_t], None),
                                ("ggml_op_name", [ctypes.c_int], ctypes.c_char_p),
                                ("ggml_type_name", [ctypes.c_int], ctypes.c_char_p)):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, res
            setattr(self, name, fn)
        self.lib = lib

    def name(self, t: int) -> str:
        return (self.ggml_get_name(t) or b"").decode("utf-8", "replace")

    def read(self, t: int) -> np.ndarray:
        """The tensor's values, shaped [ne3, ne2, ne1, ne0] as numpy sees it, copied out of the backend buffer."""
        s = GgmlTensor.from_address(t)
        kind = _NUMPY.get(s.type)
        if kind is None:
            raise RuntimeError(f"cannot read a ggml tensor of type {self.ggml_type_name(s.type).decode()} ({self.name(t)})")
        if kind == "bfloat16":
            import ml_dtypes

            kind = ml_dtypes.bfloat16
        nbytes = self.ggml_nbytes(t)
        raw = np.empty(nbytes, dtype=np.uint8)
        self.ggml_backend_tensor_get(t, raw.ctypes.data, 0, nbytes)
        shape = tuple(int(n) for n in reversed(s.ne))
        strides = tuple(int(b) for b in reversed(s.nb))
        view = np.lib.stride_tricks.as_strided(raw.view(kind), shape=shape, strides=strides)
        return np.array(view, dtype=np.float32)


@dataclass
class CapturePlan:
    """Which graph nodes make which capture points, for one llama.cpp architecture."""

    embed: str  # node name of the embedding as layer 0 receives it
    attn: str  # node name pattern of the attention branch ("{i}" = layer), or "matmul:<weight pattern>"
    mlp: str  # likewise for the MLP branch; a name without "{i}" is assigned by graph order
    layer: str = "l_out-{i}"
    final_norm: str = "result_norm"


# llama.cpp names per architecture (src/models/<arch>.cpp). Gemma 2/3 branches are the post-branch norms, as in HF.
PLANS: dict[str, CapturePlan] = {
    "llama": CapturePlan(embed="embd", attn="attn_out-{i}", mlp="ffn_out-{i}"),
    "gemma": CapturePlan(embed="inp_scaled", attn="matmul:blk.{i}.attn_output.weight", mlp="ffn_out-{i}"),
    "gemma2": CapturePlan(embed="inp_scaled", attn="attn_post_norm-{i}", mlp="ffn_post_norm"),
    "gemma3": CapturePlan(embed="inp_scaled", attn="attn_post_norm-{i}", mlp="ffn_post_norm-{i}"),
    "phi3": CapturePlan(embed="embd", attn="matmul:blk.{i}.attn_output.weight", mlp="ffn_out-{i}"),
    "qwen2": CapturePlan(embed="embd", attn="matmul:blk.{i}.attn_output.weight", mlp="ffn_out-{i}"),
    "qwen3": CapturePlan(embed="embd", attn="matmul:blk.{i}.attn_output.weight", mlp="ffn_out-{i}"),
}


@dataclass
class GraphCapture:
    """The eval callback for one forward pass: decides by name and graph order, copies the wanted nodes out."""

    ggml: Ggml
    plan: CapturePlan
    num_layers: int
    branches: bool = True
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    order: list[tuple[str, str]] = field(default_factory=list)  # (node name, capture point) in the order captured
    _layer: int = 0  # l_out nodes seen so far: the layer that unindexed names belong to
    _wanted: dict[int, str] = field(default_factory=dict)  # node address -> capture point, between ask and copy
    error: BaseException | None = None  # raised inside the callback: kept, the graph stopped, re-raised after decode

    def point_of(self, t: int) -> str | None:
        name = self.ggml.name(t)
        p = self.plan
        m = re.fullmatch(r"(.+)-(\d+)", name)
        base, index = (m.group(1), int(m.group(2))) if m else (name, None)
        if name == p.embed:
            return P.EMBED
        if name == p.final_norm:
            return P.FINAL_NORM
        if base == "l_out" and index is not None:
            return P.layer(index)
        if not self.branches:
            return None
        for kind, pattern in (("attn", p.attn), ("mlp", p.mlp)):
            if pattern.startswith("matmul:"):
                weight = pattern[len("matmul:"):]
                s = GgmlTensor.from_address(t)
                if self.ggml.ggml_op_name(s.op) == b"MUL_MAT" and s.src[0]:
                    m2 = re.fullmatch(re.escape(weight).replace(r"\{i\}", r"(\d+)"), self.ggml.name(s.src[0]))
                    if m2:
                        return P.branch(int(m2.group(1)), kind)
            elif "{i}" in pattern:
                if index is not None and pattern == f"{base}-{{i}}":
                    return P.branch(index, kind)
            elif name == pattern:  # no layer index in the name: graph order says which layer
                return P.branch(self._layer, kind)
        return None

    def __call__(self, t: int, ask: bool, user_data) -> bool:
        try:
            if ask:
                point = self.point_of(t)
                if point is not None:
                    self._wanted[t] = point
                return point is not None
            point = self._wanted.pop(t, None)
            if point is not None:
                name = self.ggml.name(t)
                if point in self.arrays:
                    raise RuntimeError(f"two graph nodes map to {point} ({self.order[-1][0]} and {name})")
                self.arrays[point] = self.ggml.read(t)
                self.order.append((name, point))
                if P.is_layer_output(point):
                    self._layer += 1
            return True
        except BaseException as e:  # an exception must not cross the C boundary: keep it, stop the graph
            self.error = e
            return False

    def expected(self) -> list[str]:
        from bughunt.trace import capture_points

        return [p for p in capture_points(self.num_layers, self.branches) if p != "logits"]
