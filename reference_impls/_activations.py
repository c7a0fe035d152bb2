"""What llama.cpp's CPU backend does to the activations before it multiplies them by a quantized weight: each row of
the input is quantized, block by block, to the weight type's `vec_dot_type`, and the dot products run on those integer
blocks. A correct llama.cpp run of a quantized model therefore computes with rounded activations as well as with
rounded weights; the reference's quantization noise floor emulates both.

Written from llama.cpp (llama-cpp-python 0.3.36's vendored tree):
- which activation type each weight type uses: `type_traits_cpu[...].vec_dot_type` in ggml/src/ggml-cpu/ggml-cpu.c
  (Q4_0, Q5_0, Q8_0 -> Q8_0; Q4_1, Q5_1 -> Q8_1; the k-quants and i-quants -> Q8_K; F16 -> F16; BF16 -> BF16);
- Q8_0 and Q8_1: `quantize_row_q8_0_ref` and `quantize_row_q8_1_ref` in ggml/src/ggml-quants.c: blocks of 32,
  d = amax / 127 held as fp16, q = roundf(x / d) (the block's values are d * q; Q8_1 also keeps s = fp16(d * sum q),
  used only against a weight's minimum, which is not emulated here);
- Q8_K: `quantize_row_q8_K_ref`: blocks of 256, iscale = -127 / (the value of largest magnitude), q = min(127,
  nearest_int(iscale * x)), d = 1 / iscale held as fp32.
The arithmetic is float32 as in the kernels; the values come back as float64."""

from __future__ import annotations

import numpy as np

# ggml weight type name -> the activation type its CPU dot product quantizes the other operand to
VEC_DOT_TYPE = {"Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "IQ4_NL": "Q8_0", "Q4_1": "Q8_1", "Q5_1": "Q8_1",
                "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K", "IQ2_XXS": "Q8_K",
                "IQ2_XS": "Q8_K", "IQ2_S": "Q8_K", "IQ3_XXS": "Q8_K", "IQ3_S": "Q8_K", "IQ1_S": "Q8_K",
                "IQ1_M": "Q8_K", "IQ4_XS": "Q8_K", "TQ1_0": "Q8_K", "TQ2_0": "Q8_K", "F16": "F16", "BF16": "BF16"}
_BLOCK = {"Q8_0": 32, "Q8_1": 32, "Q8_K": 256}


def quantize_activations(x: np.ndarray, kind: str) -> np.ndarray:
    """x (..., n) as the dot product sees it after quantizing each row to `kind` (Q8_0, Q8_1, Q8_K, F16, BF16)."""
    if kind == "F16":
        return np.asarray(x, dtype=np.float16).astype(np.float64)
    if kind == "BF16":
        import ml_dtypes

        return np.asarray(x, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    size = _BLOCK[kind]
    if x.shape[-1] % size:
        return np.asarray(x, dtype=np.float64)  # llama.cpp gives such rows another type; nothing to emulate
    blocks = np.asarray(x, dtype=np.float32).reshape(*x.shape[:-1], x.shape[-1] // size, size)
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "Q8_K":
            at = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)  # signed largest value
            iscale = np.where(at != 0, np.float32(-127.0) / at, np.float32(0.0)).astype(np.float32)
            q = np.minimum(127.0, np.rint(iscale * blocks))  # nearest_int: round half to even
            d = np.where(iscale != 0, np.float32(1.0) / iscale, np.float32(0.0)).astype(np.float32)
        else:
            d = (np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127.0)).astype(np.float32)
            inv = np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
            v = blocks * inv
            q = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))  # roundf: half away from zero
            d = d.astype(np.float16).astype(np.float32)
    return (d.astype(np.float64) * q.astype(np.float64)).reshape(x.shape)
