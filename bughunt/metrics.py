"""Comparison metrics of a candidate Trace against a reference Trace at every capture point, summed and
per position: log10 L2 of the difference (the Gemma bug-hunt figure), relative L2, cosine similarity,
max abs; on logits also KL divergence of next-token distributions and top-1 agreement. Knows nothing
about implementations."""

from __future__ import annotations

import math

import numpy as np

from bughunt.trace import Trace

# Unit roundoff of each dtype: the smallest relative error a correct implementation can be held to.
UNIT_ROUNDOFF = {"fp64": 2.0**-53, "fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11}


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _log10(x: float) -> float | None:
    if not math.isfinite(x):
        return None
    return math.log10(x) if x > 0 else None  # exact agreement has no log; stored as null


def _per_position(diff: np.ndarray, ref: np.ndarray, cand: np.ndarray) -> dict[str, list]:
    """Metrics over batch and features for each sequence position: arrays are [batch, seq, ...]."""
    s = diff.shape[1]
    d = np.moveaxis(diff, 1, 0).reshape(s, -1)
    r = np.moveaxis(ref, 1, 0).reshape(s, -1)
    c = np.moveaxis(cand, 1, 0).reshape(s, -1)
    l2 = np.sqrt((d * d).sum(-1))
    rn = np.sqrt((r * r).sum(-1))
    cn = np.sqrt((c * c).sum(-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = l2 / rn
        cos = (r * c).sum(-1) / (rn * cn)
    return {
        "log10_l2": [_log10(v) for v in l2],
        "rel_l2": [_finite(v) for v in rel],
        "cosine": [_finite(v) for v in cos],
        "max_abs": [_finite(v) for v in np.abs(d).max(-1)],
    }


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def logits_metrics(cand: np.ndarray, ref: np.ndarray) -> dict:
    """KL(P_ref || P_cand) of the next-token distributions and top-1 agreement, overall and per position."""
    lp_r, lp_c = _log_softmax(ref), _log_softmax(cand)
    with np.errstate(invalid="ignore"):
        kl = (np.exp(lp_r) * (lp_r - lp_c)).sum(-1)  # [batch, seq]
    top1 = (ref.argmax(-1) == cand.argmax(-1)).astype(np.float64)
    return {
        "kl": _finite(float(kl.mean())),
        "top1": float(top1.mean()),
        "kl_per_position": [_finite(v) for v in kl.mean(0)],
        "top1_per_position": [float(v) for v in top1.mean(0)],
    }


def compare_arrays(cand: np.ndarray, ref: np.ndarray, point: str) -> dict:
    """All metrics for one capture point. Non-finite values in the candidate are counted, not raised."""
    if cand.shape != ref.shape:
        return {"point": point, "error": f"shape {list(cand.shape)} vs reference {list(ref.shape)}"}
    c = cand.astype(np.float64)
    r = ref.astype(np.float64)
    nonfinite = int((~np.isfinite(c)).sum())
    d = c - r
    with np.errstate(invalid="ignore", over="ignore"):
        l2 = float(np.sqrt((d * d).sum()))
        rn = float(np.sqrt((r * r).sum()))
        cn = float(np.sqrt((c * c).sum()))
        rel = l2 / rn if rn > 0 else (0.0 if l2 == 0 else math.inf)
        cos = float((r * c).sum() / (rn * cn)) if rn > 0 and cn > 0 else (1.0 if l2 == 0 else 0.0)
        max_abs = float(np.abs(d).max()) if d.size else 0.0
    out = {
        "point": point,
        "l2": _finite(l2),
        "log10_l2": _log10(l2),
        "rel_l2": _finite(rel),
        "cosine": _finite(cos),
        "max_abs": _finite(max_abs),
        "nonfinite": nonfinite,
    }
    if c.ndim >= 2:
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            out["per_position"] = _per_position(d, r, c)
    if point == "logits":
        out.update(logits_metrics(c, r))
    return out


def _align(cand: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """When one input had an extra leading token (the bos toggle), compare the shared suffix of positions."""
    if cand.ndim >= 2 and ref.ndim >= 2 and cand.shape[0] == ref.shape[0] and cand.shape[2:] == ref.shape[2:] and cand.shape[1] != ref.shape[1]:
        n = min(cand.shape[1], ref.shape[1])
        return cand[:, -n:], ref[:, -n:]
    return cand, ref


def compare_traces(candidate: Trace, reference: Trace) -> list[dict]:
    """Metrics at every capture point both traces have, in forward order (suffix-aligned if lengths differ)."""
    return [compare_arrays(*_align(candidate.arrays[p], reference.arrays[p]), p) for p in reference.points() if p in candidate.arrays]
