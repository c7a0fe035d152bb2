"""The logit-lens probe (--logit-lens): the reference's final norm and unembedding applied to the residual stream
leaving every decoder layer (nostalgebraist 2020), for the reference's trace and each candidate's; per layer, how often
a candidate's top-1 token there agrees with the reference's, and how often the reference's own lens already agrees with
its final prediction. A departure the floor calls small but that flips tokens mid-model shows here. No runner code:
it reads the traces and the checkpoint's weights, in float64."""

from __future__ import annotations


import numpy as np

from bughunt import points as P
from bughunt.findings import Finding
from bughunt.probes import FlagProbe, ProbeOptions

ROWS_PER_CHUNK = 8192  # vocabulary rows of the output embedding converted to float64 at a time


class Options(ProbeOptions):
    logit_lens: bool = False


def _norm_scale(spec, w: np.ndarray) -> np.ndarray:
    # Gemma's RMSNorm scales by (1 + w) (Gemma report; HF GemmaRMSNorm); the other families by w
    return 1.0 + w if spec.family.startswith("gemma") else w


def lens_top1(residual: np.ndarray, norm_w: np.ndarray, head, spec) -> np.ndarray:
    """argmax over the vocabulary of final_norm(residual) @ head^T, [batch, seq]. The final soft-cap (tanh) is monotone,
    so it cannot change the argmax and is left out."""
    x = np.asarray(residual, dtype=np.float64)
    x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + spec.rms_eps) * _norm_scale(spec, norm_w)
    best = np.full(x.shape[:-1], -np.inf)
    arg = np.zeros(x.shape[:-1], dtype=np.int64)
    for v0 in range(0, head.shape[0], ROWS_PER_CHUNK):
        logits = x @ np.asarray(head[v0:v0 + ROWS_PER_CHUNK], dtype=np.float64).T
        i = logits.argmax(-1)
        v = np.take_along_axis(logits, i[..., None], -1)[..., 0]
        better = v > best
        best, arg = np.where(better, v, best), np.where(better, i + v0, arg)
    return arg


def lens(trace, weights, spec) -> list[np.ndarray]:
    """The lens's top-1 ids at every decoder layer of a trace (layers it lacks give None)."""
    norm_w = np.asarray(weights["model.norm.weight"], dtype=np.float64)
    head = weights["lm_head.weight"]
    names = [P.layer(i) for i in range(spec.num_layers)]
    return [lens_top1(trace.arrays[n], norm_w, head, spec) if n in trace.arrays else None for n in names]


def agreement(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    return None if a is None or b is None or a.shape != b.shape else float(np.mean(a == b))


class LogitLens(FlagProbe):
    name = "logit_lens"
    Options = Options
    flag = "--logit-lens"
    help = ("also apply the reference's final norm and unembedding to every layer's residual stream (the logit "
            "lens) and report, per layer, how often each candidate's top-1 token agrees with the reference's")
    template = "sections/logit_lens.html"
    title = "Logit lens"
    result_key = "logit_lens"

    def attach(self, data: dict, ctx) -> list[Finding]:
        from bughunt.checkpoint import load_weights

        plan = ctx.plan
        ref_label = plan.reference.label
        weights = load_weights(plan.checkpoint, plan.spec, plan.options.allow_pickle)
        ref = lens(ctx.traces[ref_label], weights, plan.spec)
        final = np.asarray(ctx.traces[ref_label].arrays[P.LOGITS]).argmax(-1)
        section = {"reference": ref_label, "layers": [P.layer(i) for i in range(plan.spec.num_layers)],
                   "reference_vs_final": [agreement(r, final) for r in ref], "candidates": []}
        findings = []
        for c in data["comparisons"]:
            top1 = [agreement(x, r) for x, r in zip(lens(ctx.traces[c["candidate"]], weights, plan.spec), ref)]
            first = next((i for i, a in enumerate(top1) if a is not None and a < 1.0), None)
            section["candidates"].append({"candidate": c["candidate"], "top1_agreement": top1,
                                          "first_layer_below_full": P.layer(first) if first is not None else None})
            findings.append(_finding(c["candidate"], ref_label, top1, first))
        data[self.result_key] = section
        return findings

    def summary(self, result_data: dict) -> list[str]:
        lens = result_data.get(self.result_key)
        if not lens:
            return []
        lines = []
        for c in lens["candidates"]:
            known = [a for a in c["top1_agreement"] if a is not None]
            first = c["first_layer_below_full"]
            what = (f"top-1 agrees with {lens['reference']} at every layer" if first is None else
                    f"top-1 first disagrees at {first}; {min(known):.0%} of positions agree at worst")
            lines.append(f"logit lens {c['candidate']}: {what}")
        return lines


def _finding(label: str, ref: str, top1: list, first: int | None) -> Finding:
    if first is None:
        return Finding("info", "logit_lens", f"logit lens: {label}'s top-1 token agrees with {ref}'s at every position of every "
                                             "layer under the reference's final norm and unembedding", label)
    worst = min(a for a in top1 if a is not None)
    return Finding("info", "logit_lens", f"logit lens: {label}'s top-1 token first disagrees with {ref}'s at {P.layer(first)} "
                                         f"({top1[first]:.0%} of positions agree there; {worst:.0%} at worst)", label,
                   P.layer(first))


PROBE = LogitLens()
