"""Judging one cell: its comparison against its baseline and the matrix's thresholds, as Violations in forward order
of capture point; and the explanation a toggle search attached to the Result, when there is one."""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass

import numpy as np

from bughunt.ci.baseline import Cell
from bughunt.ci.matrix import Threshold
from bughunt.metric_table import METRICS
from bughunt.numbers import multiple


@dataclass
class Violation:
    point: str  # the capture point it concerns (the worst point of a summary rule)
    detail: str  # "rel_l2 3.2e-03 vs baseline 4.1e-07 (7800x, limit 10x + 1e-06)"
    order: tuple = ()

    @property
    def text(self) -> str:
        return f"{self.point} {self.detail}"


def _value(point: dict, metric: str) -> float | None:
    v = point.get(metric)
    if v is None and METRICS[metric].log10:
        return -math.inf  # a log10 metric is null when the difference is exactly zero
    return v


def _times(r: float) -> str:
    """A multiple of the baseline or the floor; an infinite one is a departure from a baseline of exactly zero."""
    return "from exact agreement" if math.isinf(r) else multiple(r)


def _baseline_check(rule: Threshold, v: float | None, b: float | None) -> str | None:
    metric = METRICS[rule.metric]
    bad_v, bad_b = metric.badness(v), metric.badness(b)
    if bad_v is None:
        return f"{rule.metric} is missing in this run (baseline {metric.format(b)})"
    bad_b = max(bad_b or 0.0, 0.0)
    assert rule.baseline_factor is not None
    if bad_v <= rule.baseline_factor * bad_b + rule.slack:
        return None
    ratio = bad_v / bad_b if bad_b > 0 else math.inf
    what = "" if metric.judged_as == metric.name else f"{metric.judged_as} "
    return (f"{rule.metric} {metric.format(v)} vs baseline {metric.format(b)} "
            f"({what}{_times(ratio)}, limit {rule.baseline_factor:g}x + {rule.slack:g})")


def _absolute_check(rule: Threshold, v: float | None) -> str | None:
    metric = METRICS[rule.metric]
    if v is None:
        return f"{rule.metric} is missing in this run"
    if metric.bounds_magnitude:  # a loss moved either way is a difference
        if rule.max is not None and abs(v) > rule.max:
            return f"{metric.judged_as} {abs(v):.1e} above the limit {rule.max:g}"
        if rule.min is not None and abs(v) < rule.min:
            return f"{metric.judged_as} {abs(v):.1e} below the minimum {rule.min:g}"
        return None
    if rule.max is not None and v > rule.max:
        return f"{rule.metric} {metric.format(v)} above the limit {rule.max:g}"
    if rule.min is not None and v < rule.min:
        return f"{rule.metric} {metric.format(v)} below the minimum {rule.min:g}"
    return None


def _floor_check(rule: Threshold, point: dict, v: float | None, dtype: str) -> str | None:
    metric = METRICS[rule.metric]
    assert rule.floor_factor is not None and metric.floor is not None
    floor, bad_v = point.get(metric.floor), metric.badness(v)
    if floor is None or bad_v is None:
        return f"{rule.metric} has no noise floor to compare with"
    if bad_v > rule.floor_factor * floor:
        return (f"{metric.judged_as} {bad_v:.1e} is {_times(bad_v / floor)} the {dtype} noise floor {floor:.1e} "
                f"(limit {rule.floor_factor:g}x)")
    return None


def _reduce(summary: str, rows: list[tuple[str, float]]) -> tuple[str, float]:
    if summary == "max":
        return max(rows, key=lambda r: r[1])
    if summary == "min":
        return min(rows, key=lambda r: r[1])
    return rows[-1][0], float(np.mean([v for _, v in rows]))


def _unusable_points(current: dict[str, dict], base: dict[str, dict] | None) -> list[tuple[str, str]]:
    """Points no rule can judge: errors, NaN/Inf, and points the baseline and this run do not share."""
    found = []
    for name, p in current.items():
        if p.get("error"):
            found.append((name, f"could not be compared: {p['error']}"))
        elif p.get("nonfinite"):
            found.append((name, f"has {p['nonfinite']} NaN/Inf values"))
    if base is not None:
        found += [(name, "is in the baseline but missing from this run") for name in base if name not in current]
        found += [(name, "is not in the baseline. If the capture points changed on purpose, rerun with --update-baseline")
                  for name in current if name not in base]
    return found


def _summary_problem(rule: Threshold, names: list[str], current: dict, base: dict | None) -> tuple[str, str] | None:
    """(point, detail) where a summary rule (one number over the matched points) fails, or None."""
    assert rule.summary is not None
    rows = [(n, _value(current[n], rule.metric)) for n in names]
    if any(v is None for _, v in rows):
        return names[0], f"{rule.metric} is missing in this run"
    at, v = _reduce(rule.summary, rows)  # type: ignore[arg-type]
    label = f"{rule.summary} over {rule.points}" + (f" (at {at})" if rule.summary != "mean" else "")
    msg = _absolute_check(rule, v) if (rule.max is not None or rule.min is not None) else None
    if msg is None and rule.baseline_factor is not None and base is not None:
        brows = [(n, _value(base[n], rule.metric)) for n in names if n in base]
        b = _reduce(rule.summary, brows)[1] if brows and all(x is not None for _, x in brows) else None  # type: ignore[arg-type]
        msg = _baseline_check(rule, v, b)
    return (at, f"{label}: {msg}") if msg else None


def _point_problem(rule: Threshold, name: str, current: dict, base: dict | None, dtype: str) -> str | None:
    """What is wrong at one capture point under a per-point rule, or None."""
    p = current[name]
    v = _value(p, rule.metric)
    msg = _absolute_check(rule, v) if (rule.max is not None or rule.min is not None) else None
    if msg is None and rule.floor_factor is not None:
        msg = _floor_check(rule, p, v, dtype)
    if msg is None and rule.baseline_factor is not None and base is not None and name in base:
        msg = _baseline_check(rule, v, _value(base[name], rule.metric))
    return msg


def judge_cell(cell: Cell, comparison: dict, baseline: dict | None, thresholds: tuple[Threshold, ...]) -> list[Violation]:
    """Every way the cell misses its baseline or thresholds, in forward order of capture point.
    With no baseline (when recording one), the baseline rules are skipped and the rest still apply."""
    from bughunt.trace import point_order

    current = {p["point"]: p for p in comparison["points"]}
    base = {p["point"]: p for p in baseline["points"]} if baseline else None
    found = [Violation(point, detail, (point_order(point), -1)) for point, detail in _unusable_points(current, base)]
    bad = {v.point for v in found}
    for rule in thresholds:
        if not fnmatch.fnmatchcase(cell.id, rule.cells):
            continue
        names = [n for n in current if fnmatch.fnmatchcase(n, rule.points) and n not in bad
                 and (not METRICS[rule.metric].logits_only or n == "logits")]
        if not names:
            continue
        if rule.summary:
            problems = [problem] if (problem := _summary_problem(rule, names, current, base)) else []
        else:
            problems = [(n, msg) for n in names if (msg := _point_problem(rule, n, current, base, cell.dtype))]
        found += [Violation(point, detail, (point_order(point), rule.index)) for point, detail in problems]
    found.sort(key=lambda v: v.order)
    return found


def diagnosis_text(result, candidate: str) -> str | None:
    """The explanation a toggle search attached to the Result (result.data["diagnosis"]), for one candidate.
    Accepts a string, a {"message": ...} table, a table keyed by candidate label, or a list of such entries."""
    d = result.data.get("diagnosis") if result is not None else None
    if not d:
        return None
    if isinstance(d, dict) and candidate in d:
        d = d[candidate]
    elif isinstance(d, list):
        d = [x for x in d if not isinstance(x, dict) or x.get("candidate", x.get("implementation", candidate)) == candidate]
        d = "; ".join(str(x.get("message", x) if isinstance(x, dict) else x) for x in d) or None
    if isinstance(d, dict):
        d = d.get("message") or d.get("summary") or json.dumps(d, sort_keys=True)
    return str(d) if d else None
