"""The numerics of the float64 reference forward passes: rounding to an emulated dtype, linear layers, RMSNorm,
activations, RoPE and its scalings, softmax attention and the output embedding, each written from its paper.

Everything is computed in float64. A `Policy` says where a real implementation would round to a lower-precision dtype;
`Numerics` applies exactly those roundings (bf16/fp16 via ml_dtypes), so the reference can reproduce a given dtype
policy step by step, or run with no rounding at all (fp64). How the weights reach these functions is
reference_impls/_weights.py; where the capture points go is reference_impls/_capture.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np

DTYPES = {"fp64": None, "fp32": np.float32, "bf16": ml_dtypes.bfloat16, "fp16": np.float16}

GELU = ("exact", "tanh")
ROPE_DTYPE = ("fp32", "model")
ROPE_PAIRING = ("half", "interleaved")
NORM_DTYPE = ("fp32", "mixed", "model")
EMBED_SCALE_DTYPE = ("fp32", "model")
# How the products of a matrix multiply are summed. Not a toggle (no implementation chooses it on purpose): the noise
# floor's passes use the fp32 orders, since a correct fp32, bf16 or fp16 GEMM sums in fp32 in whatever order its
# kernel blocks the reduction, and two correct kernels differ by that order's rounding, not by one final rounding.
ACCUMULATE = ("exact", "fp32", "fp32-reversed")


# Every numerics choice of the Policy below and the values it takes: bughunt's toggles of the same names are read off
# this table (bughunt/toggles.py), so a new choice is a field here, its values here, and a line saying what it means.
POLICY_CHOICES: dict[str, tuple[str, ...]] = {
    "gelu": GELU, "rope_dtype": ROPE_DTYPE, "rope_pairing": ROPE_PAIRING, "norm_dtype": NORM_DTYPE,
    "embed_scale_dtype": EMBED_SCALE_DTYPE, "rope_positions": ("fp32", "model"), "longrope_switch": ("orig", "orig+1", "orig+2"),
    "weights_dtype": ("model", "fp16", "bf16"), "kv_dtype": ("model", "fp16", "bf16", "fp8"),
    "attn_dtype": ("mixed", "fp32", "model"), "logits_dtype": ("model", "fp32"), "matmul_inputs": ("model", "tf32", "bf16", "fp16"),
}


@dataclass(frozen=True)
class Policy:
    """Where the forward pass rounds. dtype="fp64" rounds nowhere; the other fields say how each
    step behaves when a lower-precision model dtype is emulated (some, like gelu and rope_pairing,
    change the maths itself and matter at every dtype)."""

    dtype: str = "fp64"  # emulated model dtype: weights and each op's output are rounded to it
    gelu: str | None = None  # "exact" (erf, GELU paper eq. 1) | "tanh" (paper's approximation); None: the spec's activation
    rope_dtype: str = "fp32"  # "fp32": inv_freq, positions and cos/sin in fp32, rounded to the model dtype at the end; "model": inv_freq and positions rounded to the model dtype first
    rope_pairing: str = "half"  # "half": (x[i], x[i+d/2]) rotate together (GPT-NeoX/HF layout); "interleaved": (x[2i], x[2i+1]) (RoFormer paper)
    norm_dtype: str | None = None  # "fp32": normalise and scale in fp32; "mixed": normalise in fp32, round, scale in model dtype (Llama HF); "model": all in model dtype; None: family default
    embed_scale_dtype: str = "model"  # "model": sqrt(hidden) rounded to the model dtype before the multiply (55.4256 -> 55.5 in bf16); "fp32": kept in fp32
    rope_positions: str = "fp32"  # "model": positions alone rounded to the model dtype before the angle (bf16: 8191 -> 8192)
    longrope_switch: str = "orig+1"  # the first input length that uses longrope's long factors: "orig", "orig+1" (Phi-3's code: length > original_max), "orig+2" (one token late)
    # Storage and precision (bughunt/toggles.py says what each value means):
    weights_dtype: str = "model"  # "fp16"/"bf16": every weight rounded to that dtype on load, then to the model dtype
    kv_dtype: str = "model"  # "fp16"/"bf16"/"fp8": K (after RoPE) and V rounded to a cache dtype before attention
    attn_dtype: str = "mixed"  # "mixed": scores in the model dtype, softmax in fp32 (HF eager); "fp32": both in fp32; "model": both in the model dtype
    logits_dtype: str = "model"  # "fp32": the output embedding's product (and soft-cap) kept in fp32
    matmul_inputs: str = "model"  # "tf32"/"bf16"/"fp16": both operands of each linear layer rounded to that first
    # "exact": products summed in float64, the result rounded once (an ideal fused GEMM); "fp32": summed in fp32 by
    # numpy's BLAS (sgemm) in its own blocking order; "fp32-reversed": the same with the reduction's order reversed
    accumulate: str = "exact"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"Policy.dtype={self.dtype!r}; allowed: {tuple(DTYPES)}")
        if self.accumulate not in ACCUMULATE:
            raise ValueError(f"Policy.accumulate={self.accumulate!r}; allowed: {ACCUMULATE}")
        for name, allowed in POLICY_CHOICES.items():
            allowed = allowed + ((None,) if name in ("gelu", "norm_dtype") else ())  # None: the spec's or family's own
            if getattr(self, name) not in allowed:
                raise ValueError(f"Policy.{name}={getattr(self, name)!r}; allowed: {allowed}")


# Bytes of float64 one step may hold at once (a vocabulary chunk of the output embedding, a block of attention
# scores): large enough for BLAS to run at full speed, small enough that memory stays bounded by one layer.
CHUNK_BYTES = 64 << 20
# Bytes of one block of attention scores. The softmax makes several temporaries of the block's size; kept this small
# they stay in the CPU cache and come from malloc's heap, not from fresh pages. Larger blocks were measured 3-5x
# slower at 512 tokens (a fresh 64 MB temporary spends most of its time in page faults), for the same arithmetic.
ATTN_BLOCK_BYTES = 4 << 20


def quantized_operand(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x as a product with weight w sees it: quantized to w's activation type where w carries one (llama.cpp)."""
    kind = getattr(w, "activations", None)
    if kind is None:
        return x
    from reference_impls._activations import quantize_activations

    return quantize_activations(x, kind)


class Numerics:
    """Float64 maths with the roundings a Policy asks for."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.dt = DTYPES[policy.dtype]

    # -- rounding ---------------------------------------------------------------------------
    def r(self, x: np.ndarray) -> np.ndarray:
        """Round to the model dtype (identity for fp64)."""
        x = np.asarray(x, dtype=np.float64)
        if self.dt is None:
            return x
        with np.errstate(over="ignore"):  # overflow to inf is what the emulated dtype does; traces report it
            return x.astype(self.dt).astype(np.float64)

    def r32(self, x: np.ndarray) -> np.ndarray:
        """Round to fp32, the 'upcast' precision of mixed-precision code (identity for fp64)."""
        x = np.asarray(x, dtype=np.float64)
        return x if self.dt is None else x.astype(np.float32).astype(np.float64)

    def r_to(self, x: np.ndarray, dtype: str) -> np.ndarray:
        """Round to a storage dtype whatever the model dtype ("model": to the model dtype): fp16, bf16, fp8 (e4m3,
        saturating at +-448 as fp8 caches do), tf32 (fp32 with a 10-bit mantissa, round to nearest even)."""
        if dtype == "model":
            return self.r(x)
        x = np.asarray(x, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            if dtype == "tf32":
                bits = x.astype(np.float32).view(np.uint32)
                bits = (bits + np.uint32(0x0FFF) + ((bits >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
                return bits.view(np.float32).astype(np.float64)
            if dtype == "fp8":
                return np.clip(x, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
            return x.astype(DTYPES[dtype]).astype(np.float64)

    # -- building blocks --------------------------------------------------------------------
    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """a @ b, its products summed as Policy.accumulate says: in float64 ("exact"), or in fp32 by BLAS, in its order
        or with the reduction reversed (operands already rounded to fp32 or lower are exact in fp32)."""
        if self.policy.accumulate == "exact":
            return a @ b
        if self.policy.accumulate == "fp32-reversed":
            a, b = a[..., ::-1], b[..., ::-1, :]
        with np.errstate(invalid="ignore", over="ignore"):
            return np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(np.float64)

    def linear(self, x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
        """y = x W^T (+ b), the output rounded once (as a fused GEMM does); the products are summed as
        Policy.accumulate says."""
        if self.policy.matmul_inputs != "model":  # TF32 or autocast: the product sees rounded operands
            x, w = self.r_to(x, self.policy.matmul_inputs), self.r_to(w, self.policy.matmul_inputs)
        x, w = quantized_operand(x, w), np.asarray(w)  # llama.cpp's quantized weights: activations quantized too
        with np.errstate(invalid="ignore", over="ignore"):  # inf from an emulated overflow propagates as it would
            y = self.matmul(x, w.T)
            return self.r(y if b is None else y + b)

    def rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float, form: str, norm_dtype: str) -> np.ndarray:
        """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * scale, scale = w or (1 + w) (Gemma)."""
        if norm_dtype == "model":
            r = self.r
            inv = r(1.0 / np.sqrt(r(r(np.mean(r(x * x), axis=-1, keepdims=True)) + eps)))
            normed = r(x * inv)
            scale = r(1.0 + w) if form == "one_plus_w" else w
            return r(normed * scale)
        r32 = self.r32
        normed = r32(x * r32(1.0 / np.sqrt(r32(np.mean(x * x, axis=-1, keepdims=True) + eps))))
        scale = r32(1.0 + w) if form == "one_plus_w" else w
        if norm_dtype == "fp32":  # scale in fp32, then one rounding to the model dtype
            return self.r(normed * scale)
        return self.r(self.r(normed) * scale)  # "mixed": round first, scale in the model dtype

    def activation(self, x: np.ndarray, kind: str) -> np.ndarray:
        """GELU (Hendrycks & Gimpel 2016), exact erf form or its tanh approximation; SiLU (x * sigmoid(x))."""
        if kind == "gelu_exact":
            from scipy.special import erf  # here, not at import: the policy table is read where scipy is absent (workers)

            y = 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
        elif kind == "gelu_tanh":
            y = 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
        elif kind == "silu":
            y = x / (1.0 + np.exp(-x))
        else:
            raise ValueError(f"unknown activation {kind}")
        return self.r(y)

    def rope_inv_freq(self, rope, rot_dim: int, seq_len: int, max_pos: int, original_max: int | None) -> tuple[np.ndarray, float]:
        """Inverse frequencies [rot_dim/2] and the attention factor that multiplies cos and sin, per RoPE scaling type
        (rope.type): default (Su et al. 2021) theta^(-2i/d), and the scalings below."""
        r32 = self.r32
        theta, kind, extra = rope.theta, rope.type, rope.extra
        exponent = r32(np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim)
        orig = int(extra.get("original_max_position_embeddings") or original_max or max_pos)
        if kind == "dynamic":
            theta = _dynamic_ntk_theta(theta, rope.factor, rot_dim, seq_len, max_pos)
        inv = r32(1.0 / r32(theta ** exponent))
        if kind in ("default", "dynamic"):
            return inv, 1.0
        if kind == "linear":  # position interpolation (Chen et al. 2023): every frequency divided by factor
            return r32(inv / rope.factor), 1.0
        if kind == "yarn":
            return self._yarn(inv, rope, rot_dim, orig)
        if kind == "llama3":
            return self._llama3(inv, rope, orig), 1.0
        if kind == "longrope":
            return self._longrope(rope, exponent, seq_len, max_pos, orig)
        raise NotImplementedError(f"rope_type {kind}")

    def _yarn(self, inv: np.ndarray, rope, rot_dim: int, orig: int) -> tuple[np.ndarray, float]:
        """YaRN (Peng et al. 2023): per-dimension blend of interpolation (1/factor) and extrapolation, ramped between
        the dimensions that rotate beta_fast and beta_slow times over the original length; attention factor
        0.1 ln(factor) + 1 unless the config gives one."""
        r32, extra, factor = self.r32, rope.extra, rope.factor
        beta_fast, beta_slow = extra.get("beta_fast") or 32, extra.get("beta_slow") or 1

        def dim_of(rotations):  # the dimension that rotates `rotations` times over the original length
            return rot_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

        low, high = dim_of(beta_fast), dim_of(beta_slow)
        if extra.get("truncate", True):  # the config's `truncate` (default true): whole dimensions
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rot_dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(rot_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrapolate = 1 - ramp
        inv = r32(r32(inv / factor) * (1 - extrapolate) + inv * extrapolate)
        if extra.get("attention_factor") is not None:
            return inv, float(extra["attention_factor"])
        if extra.get("mscale") and extra.get("mscale_all_dim"):  # DeepSeek-style configs: a ratio of two mscales
            return inv, _yarn_mscale(factor, extra["mscale"]) / _yarn_mscale(factor, extra["mscale_all_dim"])
        return inv, _yarn_mscale(factor)

    def _llama3(self, inv: np.ndarray, rope, orig: int) -> np.ndarray:
        """Llama 3.1 release: wavelengths longer than L_orig / low_freq_factor divided by factor, shorter than
        L_orig / high_freq_factor kept, a smooth blend in between."""
        extra = rope.extra
        low_ff = 1.0 if extra.get("low_freq_factor") is None else extra["low_freq_factor"]  # null: not given
        high_ff = 4.0 if extra.get("high_freq_factor") is None else extra["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > orig / low_ff, inv / rope.factor, inv)
        smooth = (orig / wavelen - low_ff) / (high_ff - low_ff)
        blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < orig / high_ff) & ~(wavelen > orig / low_ff)
        return self.r32(np.where(medium, blended, scaled))

    def _longrope(self, rope, exponent: np.ndarray, seq_len: int, max_pos: int, orig: int) -> tuple[np.ndarray, float]:
        """LongRoPE (Phi-3 report; Ding et al. 2024): per-dimension rescale factors, short_factor until the input
        length exceeds original_max_position_embeddings (Policy.longrope_switch says where), long_factor from then
        on; attention factor sqrt(1 + ln(max_pos / L_orig) / ln(L_orig))."""
        r32, extra = self.r32, rope.extra
        first_long = orig + {"orig": 0, "orig+1": 1, "orig+2": 2}[self.policy.longrope_switch]
        long = seq_len >= first_long
        ext = np.asarray(extra["long_factor"] if long else extra["short_factor"], dtype=np.float64)
        inv = r32(1.0 / r32(ext * r32(rope.theta ** exponent)))
        factor = extra.get("factor") or max_pos / orig
        if extra.get("attention_factor") is not None:
            return inv, float(extra["attention_factor"])
        return inv, (1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig)))

    def rope_cos_sin(self, positions: np.ndarray, rope, rot_dim: int, spec) -> tuple[np.ndarray, np.ndarray]:
        """cos/sin tables [seq, rot_dim]: angle = pos * inv_freq, computed in fp32, scaled by the attention factor,
        rounded to the model dtype at the end. rope_dtype="model" rounds inv_freq and the positions to the model
        dtype first (what happens when the inv_freq buffer is cast by model.to(bf16) and positions are made in
        bf16: 8191 -> 8192); rope_positions="model" rounds only the positions."""
        r32 = self.r32
        seq_len = int(positions.max()) + 1
        inv_freq, attention = self.rope_inv_freq(rope, rot_dim, seq_len, spec.max_position_embeddings,
                                                 spec.original_max_position_embeddings)
        pos = positions.astype(np.float64)
        if self.policy.rope_dtype == "model":
            inv_freq, pos = self.r(inv_freq), self.r(pos)
        if self.policy.rope_positions == "model":
            pos = self.r(pos)
        angles = r32(pos[:, None] * inv_freq[None, :])
        if self.policy.rope_pairing == "half":
            angles = np.concatenate([angles, angles], axis=-1)
        else:
            angles = np.repeat(angles, 2, axis=-1)
        cos, sin = r32(np.cos(angles)), r32(np.sin(angles))
        if attention != 1.0:
            cos, sin = r32(cos * attention), r32(sin * attention)
        return self.r(cos), self.r(sin)

    def apply_rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Rotate the first cos.shape[-1] features of x [batch, heads, seq, head_dim]; the rest pass through."""
        rot = cos.shape[-1]
        xr, xp = x[..., :rot], x[..., rot:]
        if self.policy.rope_pairing == "half":
            partner = np.concatenate([-xr[..., rot // 2:], xr[..., : rot // 2]], axis=-1)
        else:
            partner = np.stack([-xr[..., 1::2], xr[..., 0::2]], axis=-1).reshape(xr.shape)
        out = self.r(self.r(xr * cos) + self.r(partner * sin))
        return np.concatenate([out, xp], axis=-1)

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, softcap: float | None,
                  window: int | None, out=None, point: str | None = None) -> np.ndarray:
        """Causal softmax attention, q [b, h, s, d], k/v [b, kv_h, s, d]; query head i uses kv head i // (h / kv_h)
        (grouped-query attention, Ainslie et al. 2023). A sliding window lets query t see keys t-window+1..t.
        Queries are taken in blocks of at most ATTN_BLOCK_BYTES of scores (each query row is independent).
        When `out` asks for the points inside the layer (out.inner), they go to `{point}.q`, `.k` (after RoPE),
        `.scores` (after scale and soft-cap; masked positions hold 0), `.probs` and `.out` (heads merged, before the
        output projection), [batch, seq, ...]; scores and probs are filled a block of queries at a time."""
        b, h, s, d = q.shape
        kvh = k.shape[1]
        inner = point if getattr(out, "inner", False) else None
        if inner:
            out[f"{inner}.q"], out[f"{inner}.k"] = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
            scores_out, probs_out = out.buffer(f"{inner}.scores", (b, s, h, s)), out.buffer(f"{inner}.probs", (b, s, h, s))
        if self.policy.kv_dtype != "model":  # what a KV cache in a lower precision gives back
            k, v = self.r(self.r_to(k, self.policy.kv_dtype)), self.r(self.r_to(v, self.policy.kv_dtype))
        mode = self.policy.attn_dtype
        rs = self.r32 if mode == "fp32" else self.r  # where scores are rounded
        qg = q.reshape(b, kvh, h // kvh, s, d)  # the query heads that share one kv head, side by side
        kt, vg = np.swapaxes(k, -1, -2)[:, :, None], v[:, :, None]
        merged = np.empty((b, kvh, h // kvh, s, v.shape[-1]))
        block = max(1, min(CHUNK_BYTES, ATTN_BLOCK_BYTES) // (8 * b * h * s))
        for q0 in range(0, s, block):
            q1 = min(s, q0 + block)
            # Only the keys some query of the block may see: causal, so none after q1; a window, none before q0-window+1.
            # The keys left out would get probability 0 and add nothing.
            k0 = 0 if window is None else max(0, q0 - window + 1)
            scores = rs(rs(self.matmul(qg[..., q0:q1, :], kt[..., k0:q1])) * scale)
            if softcap is not None:  # Gemma 2: cap * tanh(scores / cap)
                scores = rs(rs(np.tanh(rs(scores / softcap))) * softcap)
            qi, ki = np.arange(q0, q1)[:, None], np.arange(k0, q1)[None, :]
            allowed = ki <= qi
            if window is not None:
                allowed &= (qi - ki) < window
            if inner:  # [b, kvh, g, queries, keys] -> [b, queries, h, keys], every key (0 where masked)
                scores_out[:, q0:q1] = self._all_keys(np.where(allowed, scores, 0.0), k0, s).reshape(b, h, q1 - q0, s).transpose(0, 2, 1, 3)
            scores = np.where(allowed, scores, -np.inf)
            if mode == "model":  # each step of the softmax rounded to the model dtype
                p = self.r(np.exp(self.r(scores - scores.max(axis=-1, keepdims=True))))
                p = self.r(p / self.r(p.sum(axis=-1, keepdims=True)))
            else:
                scores = scores - scores.max(axis=-1, keepdims=True)
                p = np.exp(scores)
                p = self.r(self.r32(p / p.sum(axis=-1, keepdims=True)))  # softmax in fp32, then back to the model dtype
            if inner:
                probs_out[:, q0:q1] = self._all_keys(p, k0, s).reshape(b, h, q1 - q0, s).transpose(0, 2, 1, 3)
            merged[..., q0:q1, :] = self.r(self.matmul(p, vg[..., k0:q1, :]))
        merged = merged.reshape(b, h, s, v.shape[-1])
        if inner:
            out[f"{inner}.scores"], out[f"{inner}.probs"] = scores_out, probs_out
            out[f"{inner}.out"] = merge_heads(merged)
        return merged

    @staticmethod
    def _all_keys(block: np.ndarray, k0: int, s: int) -> np.ndarray:
        """A block over keys k0..k0+width widened to all s keys, zero elsewhere (the points inside the layer hold every key)."""
        full = np.zeros(block.shape[:-1] + (s,))
        full[..., k0:k0 + block.shape[-1]] = block
        return full

    def logits(self, x: np.ndarray, weights, name: str, cap: float | None, out: np.ndarray):
        """x W^T for the output embedding, soft-capped, one vocabulary chunk at a time into `out` [b, s, vocab]: the
        float64 copy of the embedding matrix is never whole in memory (`weights` is a reference_impls._weights.Weights,
        read by `shape` and `rows`). A generator: it yields after each chunk."""
        vocab = weights.shape(name)[0]
        step = max(1, CHUNK_BYTES // (8 * x.shape[-1]))
        for v0 in range(0, vocab, step):
            w = weights.rows(name, slice(v0, v0 + step))
            if self.policy.logits_dtype == "fp32":  # the product and its soft-cap kept in fp32
                y = self.r32(self.matmul(quantized_operand(x, w), np.asarray(w).T))
                out[..., v0:v0 + step] = y if cap is None else self.r32(self.r32(np.tanh(self.r32(y / cap))) * cap)
            else:
                out[..., v0:v0 + step] = self.softcap(self.linear(x, w), cap)
            yield

    def softcap(self, x: np.ndarray, cap: float | None) -> np.ndarray:
        if cap is None:
            return x
        return self.r(self.r(np.tanh(self.r(x / cap))) * cap)


def split_heads(x: np.ndarray, n: int, d: int) -> np.ndarray:
    """[b, s, n*d] -> [b, n, s, d]"""
    b, s, _ = x.shape
    return x.reshape(b, s, n, d).transpose(0, 2, 1, 3)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """[b, n, s, d] -> [b, s, n*d]"""
    b, n, s, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, n * d)


def _dynamic_ntk_theta(theta: float, factor: float, rot_dim: int, seq_len: int, max_pos: int) -> float:
    """Dynamic NTK scaling (bloc97 2023; the trained length L_train is max_position_embeddings, as configs use it):
    the base grows to theta * (factor * L / L_train - (factor - 1))^(d / (d - 2)) once the input length L exceeds
    L_train."""
    length = max(seq_len, max_pos)
    return theta * ((factor * length / max_pos) - (factor - 1)) ** (rot_dim / (rot_dim - 2))


def _yarn_mscale(scale: float, m: float = 1.0) -> float:
    """YaRN's attention factor (Peng et al. 2023): 0.1 m ln(scale) + 1, and 1 at scales up to 1."""
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def resolve(spec, policy: Policy, default_norm_dtype: str) -> tuple[Numerics, str, str]:
    """The Numerics for a policy, the activation kind and the norm dtype to use for this spec."""
    act = spec.activation if policy.gelu is None or not spec.activation.startswith("gelu") else "gelu_" + policy.gelu
    return Numerics(policy), act, policy.norm_dtype or default_norm_dtype
