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


def _final_norm(residual: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    """The reference's final RMSNorm in float64: x / sqrt(mean(x^2) + eps) * scale."""
    x = np.asarray(residual, dtype=np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def lens(traces: dict, weights, spec) -> dict[str, list[np.ndarray | None]]:
    """label -> the lens's top-1 ids [batch, seq] at every decoder layer of that trace (None where it lacks the layer):
    argmax over the vocabulary of final_norm(residual) @ head^T. The final soft-cap (tanh) is monotone, so it cannot
    change the argmax and is left out. Each chunk of the output embedding is converted to float64 once, for every
    trace and layer."""
    scale = np.asarray(weights["model.norm.weight"], dtype=np.float64)
    scale = 1.0 + scale if spec.norm_form == "one_plus_w" else scale  # Gemma's RMSNorm scales by (1 + w)
    head = weights["lm_head.weight"]
    names = [P.layer(i) for i in range(spec.num_layers)]
    slots = [(label, i) for label, trace in traces.items() for i, name in enumerate(names) if name in trace.arrays]
    best, arg = {}, {}
    for v0 in range(0, head.shape[0], ROWS_PER_CHUNK):
        w = np.asarray(head[v0:v0 + ROWS_PER_CHUNK], dtype=np.float64)
        for key in slots:
            logits = _final_norm(traces[key[0]].arrays[names[key[1]]], scale, spec.rms_eps) @ w.T
            top = logits.argmax(-1)
            value = np.take_along_axis(logits, top[..., None], -1)[..., 0]
            better = value > best.get(key, -np.inf)
            best[key] = np.where(better, value, best.get(key, -np.inf))
            arg[key] = np.where(better, top + v0, arg.get(key, 0))
    return {label: [arg.get((label, i)) for i in range(len(names))] for label in traces}


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
        labels = [ref_label] + [c["candidate"] for c in data["comparisons"]]
        tops = lens({label: ctx.traces[label] for label in labels}, weights, plan.spec)
        ref = tops[ref_label]
        final = np.asarray(ctx.traces[ref_label].arrays[P.LOGITS]).argmax(-1)
        section = {"reference": ref_label, "layers": [P.layer(i) for i in range(plan.spec.num_layers)],
                   "reference_vs_final": [agreement(r, final) for r in ref], "candidates": []}
        findings = []
        for c in data["comparisons"]:
            top1 = [agreement(x, r) for x, r in zip(tops[c["candidate"]], ref)]
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
