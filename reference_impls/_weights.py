"""How the reference gets its weights: each tensor read from its memory-mapped safetensors file when a layer asks for
it, converted to float64 in reused buffers (large conversions split across the cores) and rounded to the emulated
dtype; `Shared` lets forward passes stepped side by side convert each tensor once between them."""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from reference_impls._numerics import Numerics

# Stored dtype -> emulated dtypes that hold every one of its values exactly (no rounding needed on conversion).
_EXACT_IN = {"bfloat16": ("fp32", "bf16"), "float16": ("fp32", "fp16"), "float32": ("fp32",)}


class Weights:
    """The checkpoint's tensors as the forward pass uses them. Each is read from its memory-mapped file when asked
    for, converted to float64 and rounded to the emulated model dtype (a model loaded at that dtype holds exactly
    these values), and dropped by the caller after use: memory stays near one layer in float64 whatever the
    model's size. `rows` gathers only some rows (the embedding of the input ids, a vocabulary chunk).

    With a `cache` (see `Shared`), forward passes stepped side by side convert each tensor once between them."""

    def __init__(self, n: Numerics, stored: dict[str, np.ndarray], cache: dict | None = None, buffers: "Buffers | None" = None):
        self.n, self.stored, self.cache = n, stored, cache
        self.buffers = buffers if buffers is not None else Buffers()
        # a mapping of memory-mapped arrays may say how to drop a used array's pages from resident memory
        self.release = getattr(stored, "release", lambda array: None)

    def _convert(self, key: tuple, read) -> np.ndarray:
        a = read()
        held = _EXACT_IN.get(np.dtype(a.dtype).name, ())
        stored = self.n.policy.weights_dtype  # a lower precision the weights are cast to on load, before the model dtype
        exact = (self.n.dt is None or self.n.policy.dtype in held) and (stored == "model" or stored in held)
        key = key + (None if exact else (self.n.policy.dtype, stored),)  # exact conversions are the same at every dtype
        if self.cache is not None and key in self.cache:
            return self.cache[key]
        a64 = self.buffers.convert(a)
        self.release(a)
        if not exact:
            a64 = self.n.r(self.n.r_to(a64, stored)) if stored != "model" else self.n.r(a64)
        if self.cache is not None:
            self.cache[key] = a64
        return a64

    def __getitem__(self, name: str) -> np.ndarray:
        return self._marked(name, self._convert((name,), lambda: self.stored[name]))

    def rows(self, name: str, index) -> np.ndarray:
        key = (name, (index.start, index.stop) if isinstance(index, slice) else np.asarray(index).tobytes())
        a = self._convert(key, lambda: self.stored[name][index])
        return self._marked(name, a) if isinstance(index, slice) else a  # ids' rows are a lookup, not a product

    def _marked(self, name: str, a: np.ndarray) -> np.ndarray:
        """A weight llama.cpp multiplies by quantized activations (the stored mapping says which: the quantization
        noise floor's weights) comes back as a view that carries the activation type (reference_impls/_activations.py)."""
        kind = getattr(self.stored, "activation_type", lambda name: None)(name)
        if kind is None:
            return a
        marked = a.view(QuantizedOperand)
        marked.activations = kind
        return marked

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.stored[name].shape)


class QuantizedOperand(np.ndarray):
    """A weight whose products see the other operand quantized to `activations` (Q8_0, Q8_1, Q8_K) first."""

    activations: str | None = None

    def __array_finalize__(self, obj) -> None:
        self.activations = getattr(obj, "activations", None)


# Conversions of at least this many elements are split across threads (numpy's casts release the GIL).
THREADED_ELEMENTS = 1 << 20


class Buffers:
    """Float64 buffers the stored weights are converted into, reused from tensor to tensor and layer to layer.

    Converting a stored (bf16) tensor into freshly allocated float64 memory costs about as much as multiplying by it
    at short inputs: most of the time goes to page faults on the new pages (glibc hands large blocks back to the
    kernel on free). Every decoder layer has the same shapes, so one buffer per shape in use at a time suffices. A
    buffer is reused only once nothing else holds it (its reference count: a view, a cache entry or a trace in memory
    keeps it), so reuse can never overwrite a value still in use. Large conversions are split across the cores."""

    def __init__(self):
        self.free: dict[tuple, list[np.ndarray]] = {}

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        held = self.free.setdefault(tuple(shape), [])
        for buf in held:
            if sys.getrefcount(buf) <= 3:  # this list, the loop variable and getrefcount's argument: nobody else
                return buf
        held.append(np.empty(shape, dtype=np.float64))
        return held[-1]

    def convert(self, a: np.ndarray) -> np.ndarray:
        """`a` in float64, in a reused buffer (float64 input is returned as it is: no copy)."""
        if np.dtype(a.dtype) == np.float64:
            return np.asarray(a)
        out = self.take(a.shape)
        workers = _pool()
        if a.ndim == 0 or a.size < THREADED_ELEMENTS or workers is None or a.shape[0] < 2:
            np.copyto(out, a, casting="unsafe")
            return out
        bounds = np.linspace(0, a.shape[0], min(cores(), 8) + 1).astype(int)
        list(workers.map(lambda i: np.copyto(out[bounds[i]:bounds[i + 1]], a[bounds[i]:bounds[i + 1]], casting="unsafe"),
                         range(len(bounds) - 1)))
        return out


def cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_POOL = []


def _pool():
    """One thread per core this process may use (at most 8), or None on one core."""
    if not _POOL:
        n = min(cores(), 8)
        _POOL.append(ThreadPoolExecutor(n, thread_name_prefix="bughunt-convert") if n > 1 else None)
    return _POOL[0]


class Shared:
    """Stored weights plus a cache of their float64 conversions, for forward passes stepped side by side."""

    def __init__(self, stored: dict[str, np.ndarray]):
        self.stored, self.cache, self.buffers = stored, {}, Buffers()


def stream_weights(n: Numerics, weights) -> Weights:
    """Weights read lazily from `weights` (name -> array, typically memory-mapped; or a `Shared`) and rounded to n's
    dtype on use."""
    if isinstance(weights, Shared):
        return Weights(n, weights.stored, weights.cache, weights.buffers)
    return Weights(n, weights)
