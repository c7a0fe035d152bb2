"""Comparison metrics of a candidate Trace against a reference Trace at every capture point, summed and
per position: log10 L2 of the difference (the Gemma bug-hunt figure), relative L2, cosine similarity,
max abs; on logits also KL divergence of next-token distributions, top-1 agreement and, given the input ids,
the loss on the input (negative log-likelihood of each actual next token). Knows nothing about implementations."""

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


# Float64 bytes one step of a comparison may hold per array: traces are read a block of positions at a time, so a
# long input's trace (gigabytes of logits) is compared without ever being whole in memory.
CHUNK_BYTES = 32 << 20


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _logits_block(c: np.ndarray, r: np.ndarray, targets: np.ndarray | None = None):
    """KL(P_ref || P_cand) of the next-token distributions and top-1 agreement, each [batch, positions]; with
    `targets` ([batch, positions] next-token ids, -1 where there is none) also each side's negative log-likelihood
    of the actual next token ([batch, positions], NaN where there is no next token)."""
    lp_r, lp_c = _log_softmax(r), _log_softmax(c)
    with np.errstate(invalid="ignore"):
        kl = (np.exp(lp_r) * (lp_r - lp_c)).sum(-1)
    top1 = (r.argmax(-1) == c.argmax(-1)).astype(np.float64)
    if targets is None:
        return kl, top1, None, None
    return kl, top1, _nll(lp_c, targets), _nll(lp_r, targets)


def _nll(logprobs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    picked = np.take_along_axis(logprobs, np.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return np.where(targets >= 0, -picked, np.nan)


def next_token_targets(tokens: np.ndarray, seq: int) -> np.ndarray:
    """[batch, seq] ids of the token each of the last `seq` positions of the input predicts (-1 at the last position).
    With the bos toggle an input may have one more or one fewer leading token than `tokens`; the next tokens are the
    input's last seq - 1 ids either way, so they come from the end of `tokens`."""
    tokens = np.atleast_2d(np.asarray(tokens, dtype=np.int64))
    out = np.full((tokens.shape[0], seq), -1, dtype=np.int64)
    if seq > 1:
        out[:, :-1] = tokens[:, tokens.shape[1] - (seq - 1):]
    return out


def token_nll(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each actual next token, [batch, seq - 1], reading the (possibly memory-mapped)
    logits a block of positions at a time."""
    from bughunt.safetensors_io import release

    b, seq, vocab = logits.shape
    targets = next_token_targets(tokens, seq)
    step = max(1, CHUNK_BYTES // max(1, b * vocab * 8))
    rows = []
    with np.errstate(invalid="ignore", over="ignore"):
        for p0 in range(0, seq - 1, step):
            p1 = min(p0 + step, seq - 1)
            rows.append(_nll(_log_softmax(np.asarray(logits[:, p0:p1], dtype=np.float64)), targets[:, p0:p1]))
    release(logits)
    return np.concatenate(rows, axis=1) if rows else np.zeros((b, 0))


def _loss_summary(nll_c: np.ndarray, nll_r: np.ndarray) -> dict:
    """Loss on the input: mean NLL (nats per token) of the candidate and the reference, their difference and the
    perplexity ratio exp(delta), the mean absolute per-token difference, and the per-position series (batch mean)."""
    nll_c, nll_r = nll_c[:, :-1], nll_r[:, :-1]  # the last position predicts nothing in the input
    if nll_c.size == 0:
        return {}
    d = nll_c - nll_r
    with np.errstate(over="ignore", invalid="ignore"):
        delta = float(d.mean())
        return {
            "nll": _finite(float(nll_c.mean())),
            "nll_reference": _finite(float(nll_r.mean())),
            "delta_nll": _finite(delta),
            "abs_delta_nll": _finite(float(np.abs(d).mean())),
            "ppl_ratio": _finite(math.exp(delta)) if math.isfinite(delta) and delta < 700 else None,
            "nll_per_position": [_finite(v) for v in nll_c.mean(0)],
            "delta_nll_per_position": [_finite(v) for v in d.mean(0)],
        }


def _logits_summary(kl: np.ndarray, top1: np.ndarray) -> dict:
    return {
        "kl": _finite(float(kl.mean())),
        "top1": float(top1.mean()),
        "kl_per_position": [_finite(v) for v in kl.mean(0)],
        "top1_per_position": [float(v) for v in top1.mean(0)],
    }


def compare_arrays(cand: np.ndarray, ref: np.ndarray, point: str, tokens: np.ndarray | None = None) -> dict:
    """All metrics for one capture point. Non-finite values in the candidate are counted, not raised. Arrays of
    shape [batch, seq, ...] (possibly memory-mapped) are read a block of positions at a time. With the input ids
    `tokens`, the logits point also gets the loss on the input (see _loss_summary), in the same pass."""
    from bughunt.safetensors_io import release

    if cand.shape != ref.shape:
        return {"point": point, "error": f"shape {list(cand.shape)} vs reference {list(ref.shape)}"}
    per_row = max(1, int(np.prod(cand.shape[:1] + cand.shape[2:], dtype=np.int64)) * 8)
    seq = cand.shape[1] if cand.ndim >= 2 else 1
    step = max(1, CHUNK_BYTES // per_row)
    sums = np.zeros(4)  # sum d^2, r^2, c^2, r.c
    maxima, nonfinite = [0.0], 0
    pos: dict[str, list] = {"d2": [], "r2": [], "c2": [], "rc": [], "max": []}
    kls, top1s, nlls_c, nlls_r = [], [], [], []
    targets = next_token_targets(tokens, seq) if tokens is not None and point == "logits" and cand.ndim == 3 else None
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for p0 in range(0, seq, step):
            block = (slice(None), slice(p0, p0 + step)) if cand.ndim >= 2 else (Ellipsis,)
            c = np.asarray(cand[block], dtype=np.float64)
            r = np.asarray(ref[block], dtype=np.float64)
            nonfinite += int((~np.isfinite(c)).sum())
            d = c - r
            if c.ndim >= 2:  # per position: sums over batch and features
                flat = lambda x: np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)  # noqa: E731
                fd, fr, fc = flat(d), flat(r), flat(c)
                for key, v in (("d2", (fd * fd).sum(-1)), ("r2", (fr * fr).sum(-1)), ("c2", (fc * fc).sum(-1)),
                               ("rc", (fr * fc).sum(-1)), ("max", np.abs(fd).max(-1) if fd.size else np.zeros(len(fd)))):
                    pos[key].append(v)
            sums += [(d * d).sum(), (r * r).sum(), (c * c).sum(), (r * c).sum()]
            if d.size:
                maxima.append(float(np.abs(d).max()))
            if point == "logits" and c.ndim >= 2:
                kl, top1, nll_c, nll_r = _logits_block(c, r, None if targets is None else targets[:, block[1]])
                kls.append(kl)
                top1s.append(top1)
                if nll_c is not None:
                    nlls_c.append(nll_c)
                    nlls_r.append(nll_r)
            del c, r, d
        release(cand)
        release(ref)
        l2, rn, cn = (float(np.sqrt(v)) for v in sums[:3])
        rel = l2 / rn if rn > 0 else (0.0 if l2 == 0 else math.inf)
        cos = float(sums[3] / (rn * cn)) if rn > 0 and cn > 0 else (1.0 if l2 == 0 else 0.0)
        max_abs = float(np.max(maxima))  # NaN anywhere stays NaN (reported as null)
    out = {
        "point": point,
        "l2": _finite(l2),
        "log10_l2": _log10(l2),
        "rel_l2": _finite(rel),
        "cosine": _finite(cos),
        "max_abs": _finite(max_abs),
        "nonfinite": nonfinite,
    }
    if cand.ndim >= 2:
        d2, r2, c2, rc, mx = (np.concatenate(pos[k]) for k in ("d2", "r2", "c2", "rc", "max"))
        with np.errstate(invalid="ignore", divide="ignore"):
            l2p, rnp, cnp = np.sqrt(d2), np.sqrt(r2), np.sqrt(c2)
            relp, cosp = l2p / rnp, rc / (rnp * cnp)
        out["per_position"] = {
            "log10_l2": [_log10(v) for v in l2p],
            "rel_l2": [_finite(v) for v in relp],
            "cosine": [_finite(v) for v in cosp],
            "max_abs": [_finite(v) for v in mx],
        }
    if kls:
        out.update(_logits_summary(np.concatenate(kls, axis=1), np.concatenate(top1s, axis=1)))
    if nlls_c:
        out.update(_loss_summary(np.concatenate(nlls_c, axis=1), np.concatenate(nlls_r, axis=1)))
    return out


def loss_floor(measured: dict, fp64_logits: np.ndarray, tokens: np.ndarray, u: float) -> dict:
    """The noise floor of the loss on the input: the mean absolute per-token difference in NLL between the
    reference emulating the dtype and float64 (it bounds the difference of the means, which can cancel), never below
    the unit roundoff times the mean NLL. Per position: the emulated reference's own difference, never below that."""
    if tokens is None or np.asarray(tokens).shape[-1] < 2:
        return {}
    if measured.get("nll_reference") is not None:
        mean_nll = measured["nll_reference"]
    else:  # fp64: nothing was emulated; the floor is the unit roundoff on the loss itself
        mean_nll = float(token_nll(fp64_logits, tokens).mean())
    floor = max(measured.get("abs_delta_nll") or 0.0, u * max(mean_nll, 1.0))
    per_pos = measured.get("delta_nll_per_position")
    out = {"floor_delta_nll": floor}
    if per_pos is not None:
        out["floor_delta_nll_per_position"] = [max(abs(v) if v is not None else 0.0, floor) for v in per_pos]
    return out


def judge_loss(p: dict, f: dict, factor: float) -> None:
    """Annotate the logits point with the loss difference's ratio to its floor and the first position above it."""
    if p.get("delta_nll") is None or not f.get("floor_delta_nll"):
        return
    p["floor_delta_nll"] = f["floor_delta_nll"]
    p["delta_nll_ratio_to_floor"] = abs(p["delta_nll"]) / f["floor_delta_nll"]
    p["nll_above_floor"] = p["delta_nll_ratio_to_floor"] > factor
    per, per_floor = p.get("delta_nll_per_position"), f.get("floor_delta_nll_per_position")
    if per is not None and per_floor is not None and len(per_floor) >= len(per):
        per_floor = per_floor[len(per_floor) - len(per):]
        p["first_position_nll_above_floor"] = next(
            (i for i, (v, fl) in enumerate(zip(per, per_floor)) if v is None or abs(v) > factor * fl), None)


def _align(cand: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """When one input had an extra leading token (the bos toggle), compare the shared suffix of positions."""
    if cand.ndim >= 2 and ref.ndim >= 2 and cand.shape[0] == ref.shape[0] and cand.shape[2:] == ref.shape[2:] and cand.shape[1] != ref.shape[1]:
        n = min(cand.shape[1], ref.shape[1])
        return cand[:, -n:], ref[:, -n:]
    return cand, ref


def compare_traces(candidate: Trace, reference: Trace, tokens: np.ndarray | None = None) -> list[dict]:
    """Metrics at every capture point both traces have, in forward order (suffix-aligned if lengths differ). With
    the input ids, the logits point also carries the loss on the input."""
    return [compare_arrays(*_align(candidate.arrays[p], reference.arrays[p]), p, tokens) for p in reference.points() if p in candidate.arrays]
