"""The fifth stage: judge each candidate's comparison against the floor and word what it shows as findings (the
first point above the floor, NaN/Inf, the loss, what a library cannot represent, failures)."""

from __future__ import annotations

from bughunt import metrics
from bughunt.findings import Finding
from bughunt.numbers import multiple


def judge(points: list[dict], floor: dict, factor: float) -> tuple[list[dict], str | None]:
    """Annotate each point with its ratio to the floor; return the first point above factor x floor."""
    first = None
    for p in points:
        f = floor["points"].get(p["point"])
        if f is None or p.get("rel_l2") is None and not p.get("nonfinite"):
            p["above_floor"] = bool(p.get("error"))
        else:
            _against_floor(p, f, factor)
        if f is not None and p["point"] == "logits":
            metrics.judge_loss(p, f, factor)
        if p["above_floor"] and first is None:
            first = p["point"]
    return points, first


def _against_floor(p: dict, f: dict, factor: float) -> None:
    rel = p["rel_l2"] if p["rel_l2"] is not None else float("inf")
    p["floor_rel_l2"] = f["floor_rel_l2"]
    p["ratio_to_floor"] = rel / f["floor_rel_l2"]
    p["above_floor"] = bool(p.get("nonfinite")) or rel > factor * f["floor_rel_l2"]
    per_floor, per_rel = f.get("floor_rel_l2_per_position"), (p.get("per_position") or {}).get("rel_l2")
    if per_floor and per_rel and len(per_floor) >= len(per_rel):
        per_floor = per_floor[len(per_floor) - len(per_rel):]  # suffix-aligned, as the metrics are
        p["first_position_above_floor"] = next(
            (i for i, (v, fl) in enumerate(zip(per_rel, per_floor)) if v is None or v > factor * fl), None)


def summary(points: list[dict]) -> dict:
    """A comparison's headline figures: its worst relative L2 and where, and the logits' KL, top-1 and loss change."""
    residual = [p for p in points if p.get("rel_l2") is not None]
    worst = max(residual, key=lambda p: p["rel_l2"], default=None)
    logits = next((p for p in points if p["point"] == "logits"), {})
    return {"max_rel_l2": worst["rel_l2"] if worst else None, "max_rel_l2_point": worst["point"] if worst else None,
            "logits_kl": logits.get("kl"), "logits_top1": logits.get("top1"), "delta_nll": logits.get("delta_nll"),
            "ppl_ratio": logits.get("ppl_ratio")}


def failure(label: str, error: str) -> Finding:
    return Finding("error", "failure", f"{label} failed: {error}", label)


def divergence(label: str, reference: str, first: str, points: list[dict], dtype: str) -> Finding:
    p = next(p for p in points if p["point"] == first)
    return Finding("warning", "divergence", f"{label} departs from {reference} at {first}: relative L2 {p['rel_l2']:.2e} "
                                            f"is {multiple(p['ratio_to_floor'])} the {dtype} noise floor ({p['floor_rel_l2']:.1e})",
                   label, first)


def nonfinite(label: str, point: dict) -> Finding:
    return Finding("error", "nonfinite", f"{label} produced {point['nonfinite']} NaN/Inf values, first at {point['point']}",
                   label, point["point"])


def _ratio_text(r: float | None) -> str:
    return "inf" if r is None else f"{r:.6g}"


def loss(label: str, reference: str, p: dict, dtype: str) -> Finding:
    at = p.get("first_position_nll_above_floor")
    return Finding("warning", "loss",
                   f"{label} changes the loss on the input: mean NLL {p['nll']:.4f} vs {p['nll_reference']:.4f} nats/token under "
                   f"{reference} (delta {p['delta_nll']:+.2e}, perplexity x{_ratio_text(p.get('ppl_ratio'))}), "
                   f"{multiple(p['delta_nll_ratio_to_floor'])} the {dtype} floor ({p['floor_delta_nll']:.1e})"
                   + (f"; first above it predicting position {at + 1}" if at is not None else ""), label, "logits")


def unrepresentable(label: str, causes: list[str], first: str | None, points: list[dict], dtype: str) -> Finding:
    """A library that cannot represent the checkpoint was run with its own values: name the cause and what it measured
    ("the library fixes rms_norm_eps at 1e-06; the checkpoint says 0.01; departs at layer.0 by 3.1e-02 relative L2")."""
    if first is None:
        worst = max((p for p in points if p.get("rel_l2") is not None), key=lambda p: p.get("ratio_to_floor") or 0.0, default=None)
        measured = "stays within the noise floor on this input" + (
            f" (at most {multiple(worst['ratio_to_floor'])} the {dtype} floor, at {worst['point']})" if worst and worst.get("ratio_to_floor") else "")
    else:
        p = next(p for p in points if p["point"] == first)
        last = points[-1]
        measured = (f"departs at {first} by {p['rel_l2']:.2e} relative L2 ({multiple(p['ratio_to_floor'])} the {dtype} floor)"
                    + (f", {last['rel_l2']:.2e} at {last['point']}" if last.get("rel_l2") is not None and last is not p else ""))
    return Finding("warning" if first else "info", "unrepresentable",
                   f"{label} cannot represent this checkpoint and ran with the library's own values: {'; '.join(causes)}; {measured}",
                   label, first)


def unrepresentable_finding(label: str, causes: list[str], first: str | None, points: list[dict], dtype: str) -> dict:
    """`unrepresentable` as the dict result.json holds (sweep's wording of the same finding)."""
    return unrepresentable(label, causes, first, points, dtype).to_dict()


def candidate_findings(entry, reference: str, points: list[dict], first: str | None) -> list[Finding]:
    """What one candidate's comparison shows: NaN/Inf or the first departure, what it cannot represent, the loss."""
    out = []
    bad = next((p for p in points if p.get("nonfinite")), None)
    if bad:
        out.append(nonfinite(entry.label, bad))
    elif first:
        out.append(divergence(entry.label, reference, first, points, entry.dtype))
    if entry.meta.get("cannot_represent"):
        out.append(unrepresentable(entry.label, entry.meta["cannot_represent"], first, points, entry.dtype))
    worse = next((p for p in points if p["point"] == "logits" and p.get("nll_above_floor")), None)
    if worse is not None and not bad:
        out.append(loss(entry.label, reference, worse, entry.dtype))
    return out


def compare_candidates(ctx, floors: dict[str, dict]) -> tuple[list[dict], list[Finding]]:
    """Every candidate that ran against the reference: its comparison (points judged, first above the floor, summary)
    and its findings; a failed candidate's failure."""
    plan = ctx.plan
    ref = plan.reference.label
    reference = ctx.traces[ref]
    comparisons, findings = [], []
    for entry in ctx.entries.values():
        if entry.label == ref:
            continue
        if entry.status != "ok":
            findings.append(failure(entry.label, entry.error))
            continue
        compared = metrics.compare_traces(ctx.traces[entry.label], reference, plan.tokens)
        points, first = judge(compared, floors[entry.dtype], plan.options.floor_factor)
        comparisons.append({"candidate": entry.label, "reference": ref, "dtype": entry.dtype, "points": points,
                            "first_above_floor": first, "summary": summary(points)})
        findings += candidate_findings(entry, ref, points, first)
    return comparisons, findings
