"""The search behind `bughunt sweep --mode search`: the toggle settings under which an implementation and the
reference agree best (exhaustive up to a few hundred combinations, greedy forward selection beyond), the other
spellings of the chosen setting, a remove-one ablation, and the residual against the noise floor in one sentence.
It judges settings only through the callables it is given (Judges), so it knows nothing about running traces."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from bughunt import progress
from bughunt.numbers import multiple
from bughunt.toggles import available, describe_setting, is_field, lookup
from bughunt import points as P

MAX_EXHAUSTIVE = 300
MARGIN = 0.05  # decades of mean improvement a change must bring to count (guards against fitting rounding noise)
# Screening (an in-process reference only): settings are first run through the decoder layers up to the one where the
# comparison first departs, and only those whose fit there is within CONFIRM_MARGIN decades of the best are run in
# full, at most CONFIRM_MAX of them. A setting that does not repair the first departing layer cannot explain it.
CONFIRM_MARGIN = 1.0
CONFIRM_MAX = 8


def label(toggles: dict[str, str]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in toggles.items()) + "}" if toggles else "{}"


def score(points: list[dict]) -> float:
    """Mean over capture points of log10(max(rel_l2, floor) / floor): 0 when every point is at or below its
    noise floor, growing with the divergence. NaN/Inf or a failed point counts as 10 decades."""
    vals = []
    for p in points:
        if p.get("error") or p.get("nonfinite") or p.get("rel_l2") is None:
            vals.append(10.0)
        else:
            vals.append(math.log10(max(p["rel_l2"], p["floor_rel_l2"]) / p["floor_rel_l2"]))
    return float(np.mean(vals)) if vals else 10.0


def fit(points: list[dict]) -> float:
    """What the search minimises: mean log10 of rel_l2 relative to the floor, not saturated at the floor (so an
    emulating reference that reproduces a bug exactly is preferred even inside the floor), bounded below at
    1e-3 x floor so bit-exact agreement does not dominate."""
    vals = []
    for p in points:
        if p.get("error") or p.get("nonfinite") or p.get("rel_l2") is None:
            vals.append(10.0)
        else:
            vals.append(math.log10(max(p["rel_l2"], 1e-3 * p["floor_rel_l2"]) / p["floor_rel_l2"]))
    return float(np.mean(vals)) if vals else 10.0


def search_counts(search: dict) -> str:
    """What a search ran, in words, for the terminal and the report: the settings judged in full, and those screened."""
    text = f"{search['method']}, {search['evaluated']} of {search['space_size']} settings evaluated"
    rounds = search.get("screening") or []
    if rounds:
        depth = sorted({r["layers"] for r in rounds})
        where = "the first decoder layer" if depth == [1] else f"the first {' or '.join(map(str, depth))} decoder layers"
        text += (f" in full; {search.get('screened', 0)} screened on {where} in {len(rounds)} "
                 f"round{'s' if len(rounds) > 1 else ''}")
    passes = search.get("passes")
    if passes:
        text += f" ({passes['full']} full and {passes['screening']} screening passes run)"
    return text


def _rank(c: dict) -> tuple:
    """Among settings that fit exactly as well, prefer the one that names a cause: ignored-field hypotheses first, the
    most specific field first (rope_parameters.partial_rotary_factor rather than all of rope_parameters)."""
    return (sum(not is_field(n) for n in c["toggles"]), -sum(n.count(".") for n in c["toggles"] if is_field(n)))


def _same(a: dict, b: dict) -> bool:
    """Whether two evaluated settings gave the same trace, as far as the comparison sees (rel L2 at every point)."""
    ra = [p.get("rel_l2") for p in a["points"]]
    rb = [p.get("rel_l2") for p in b["points"]]
    if len(ra) != len(rb) or any((x is None) != (y is None) for x, y in zip(ra, rb)):
        return False
    return all(x is None or abs(x - y) <= 1e-9 * max(abs(x), abs(y), 1e-300) for x, y in zip(ra, rb))


def _layer_of(point: str | None) -> int | None:
    """The decoder layer a capture point belongs to (the embedding counts as layer 0's), None after the last layer."""
    if point == P.EMBED:
        return 0
    return P.layer_of(point) if point is not None else None


def _within(point: str, layers: int) -> bool:
    """Whether a screening pass through `layers` decoder layers has this point."""
    layer = _layer_of(point)
    return layer is not None and layer < layers


def _screen_depth(spec, entry: dict) -> int | None:
    """How many decoder layers a screening pass runs to judge settings against `entry`: through the layer of its first
    point above the floor. At the floor the search only refines within the noise. Once settings have brought it there
    (entry has toggles), it screens on the first layer, so a refinement that acts only later (the logits' dtype) is
    not tried on top of an explained departure. A comparison at the floor as it is gets the thorough search: through
    the layer of its point furthest from the reference relative to its floor. None where that point is past half the
    model, or after the last layer (judged in full): a screening pass would save little."""
    point = entry["first_above_floor"] or ("embed" if entry["toggles"] else None)
    if point is None:
        ranked = [p for p in entry["points"] if p.get("ratio_to_floor") is not None]
        point = max(ranked, key=lambda p: p["ratio_to_floor"])["point"] if ranked else None
    layer = _layer_of(point)
    return None if layer is None or 2 * (layer + 1) > spec.num_layers else layer + 1


def _first_effect(own: dict, baseline: dict) -> str | None:
    """The first capture point where a setting's comparison differs from the baseline's (where the setting acts)."""
    for a, b in zip(own["points"], baseline["points"]):
        if not _same({"points": [a]}, {"points": [b]}):
            return a["point"]
    return None


def _shortlist(spec, settings: list[dict], against: dict, screen, evaluate_many, record: list) -> list[dict]:
    """The settings judged in full: all of them, or with screening (see CONFIRM_MARGIN) those whose fit through the
    layer where `against` departs beats against's own there by MARGIN and is within CONFIRM_MARGIN of the best there,
    fewest toggles first, at most CONFIRM_MAX."""
    layers = _screen_depth(spec, against) if screen is not None and len(settings) > CONFIRM_MAX else None
    if layers is None:
        return evaluate_many(settings)
    prefix = screen(settings, layers)
    top = min(c["fit"] for c in prefix)
    own = screen([against["toggles"]], layers)[0]["fit"]  # run already: cut to the same points, nothing runs
    order = sorted((i for i, c in enumerate(prefix) if c["fit"] <= top + CONFIRM_MARGIN and c["fit"] < own - MARGIN),
                   key=lambda i: (math.floor(prefix[i]["fit"] / MARGIN), len(prefix[i]["toggles"]), prefix[i]["fit"], _rank(prefix[i])))
    chosen = [settings[i] for i in order[:CONFIRM_MAX]]
    record.append({"layers": layers, "screened": len(settings), "confirmed": len(chosen)})
    return evaluate_many(chosen)


def _spellings(best: dict, space: dict[str, list[str]], base: dict[str, str], evaluate_many, spec=None, screen=None,
               baseline: dict | None = None) -> tuple[list[dict], list[dict]]:
    """The settings that fit exactly as well as `best`: per chosen toggle, the single toggles with the same effect
    alone (one explanation, several spellings), and the whole settings made of them that give the same trace. With
    screening, only the single toggles that give the same comparison through the layer where the chosen one first acts
    are run in full."""
    singles = [{n: v} for n, vals in space.items() for v in vals if v != base.get(n)]
    parts = []
    for name, value in best["toggles"].items():
        own = evaluate_many([{name: value}])[0]
        others = [c for c in singles if c != {name: value}]
        layer = _layer_of(_first_effect(own, baseline)) if screen is not None and baseline is not None else None
        if layer is not None and 2 * (layer + 1) <= spec.num_layers and len(others) > CONFIRM_MAX:
            own_prefix = screen([{name: value}], layer + 1)[0]
            others = [c for c, e in zip(others, screen(others, layer + 1)) if _same(e, own_prefix)]
        alts = [dict(c["toggles"]) for c in evaluate_many(others) if _same(c, own)]
        parts.append({"toggle": name, "value": value, "spellings": [{name: value}] + alts})
    combos = [dict(kv for d in combo for kv in d.items()) for combo in itertools.product(*(p["spellings"] for p in parts))]
    combos = [c for c in combos if len(c) == len(best["toggles"])][:64]
    equal = [c for c in evaluate_many(combos) if _same(c, best)] if len(combos) > 1 else [best]
    return parts, [dict(c["toggles"]) for c in equal]


@dataclass(frozen=True)
class Question:
    """What a search is asked: which toggles to vary (`items`, (name, value or None for every suggested value); none:
    every toggle the varied side can apply), the toggles' defaults, and whom the answer is about."""

    spec: object
    items: Sequence[tuple[str, str | None]]
    cannot_apply: Callable[[str], str | None]
    base: dict[str, str]
    who: str
    side: str
    max_exhaustive: int = MAX_EXHAUSTIVE


@dataclass(frozen=True)
class Judges:
    """How a search judges settings: `many(settings)` in full, all at once (so an in-process reference can run them
    side by side); `screen(settings, layers)`, when given, on their first decoder layers only, and only the settings it
    shortlists are judged in full (_shortlist)."""

    many: Callable[[list[dict[str, str]]], list[dict]]
    screen: Callable[[list[dict[str, str]], int], list[dict]] | None = None


def search(question: Question, judges: Judges, bar=progress.OFF) -> dict:
    """Find the toggle settings with the lowest score; ties go to fewer changed toggles (Occam), then to settings that
    name a cause (an ignored config field)."""
    spec, evaluate_many, screen = question.spec, judges.many, judges.screen
    screening: list[dict] = []
    start = evaluate_many([{}])[0]
    space = _space(question)
    size = math.prod(len(v) for v in space.values())
    if size <= question.max_exhaustive:
        method = "exhaustive"
        bar.update(total=size if screen is None else None)  # every combination is one setting, the one already run among them
        best = _exhaustive(spec, space, start, judges, screening)
    else:
        method = "greedy forward selection"
        best = _greedy(spec, space, question.base, judges, screening)
    parts, equivalent = _spellings(best, space, question.base, evaluate_many, spec, screen, start) if best["toggles"] else ([], [])
    ablation = _ablation(best, evaluate_many)
    at_floor = best["first_above_floor"] is None
    baseline = evaluate_many([{}])[0]
    sentence = _diagnosis(question, best, baseline, parts)
    for p in parts:
        p["description"] = describe_setting(spec, {p["toggle"]: p["value"]})[0]
    return {
        "method": method, "space": space, "space_size": size, "evaluated": None, "screening": screening,
        "best": best["toggles"], "best_score": best["score"], "best_fit": best["fit"], "baseline_score": baseline["score"],
        "baseline_fit": baseline["fit"], "explanations": parts, "equivalent": equivalent,
        "ablation": [{k: v for k, v in a.items() if k != "entry"} for a in ablation],
        "residual": {"first_above_floor": best["first_above_floor"], "max_ratio_to_floor": best["max_ratio_to_floor"]},
        "at_floor": at_floor, "diagnosis": sentence,
        "plotted": [baseline, best] + [a["entry"] for a in ablation],
    }


def _space(question: Question) -> dict[str, list[str]]:
    """Per toggle searched, the values tried: its default first, then the values given, then (for a bare name, or
    when no toggle was named) every value it suggests."""
    spec, items, base = question.spec, question.items, question.base
    names = list(dict.fromkeys(n for n, _ in items)) or [n for n in available(spec) if question.cannot_apply(n) is None]
    space: dict[str, list[str]] = {}
    for n in names:
        given = [v for m, v in items if m == n and v is not None]
        bare = any(m == n and v is None for m, v in items) or not items
        vals = [base.get(n, "")] + given + (list(lookup(n, spec).suggestions(spec)) if bare else [])
        space[n] = [v for v in dict.fromkeys(vals) if v != ""]
    return space


def _exhaustive(spec, space: dict[str, list[str]], start: dict, judges: Judges, screening: list) -> dict:
    """Every combination (those the screen shortlists), and the setting as it is; Occam: among settings within MARGIN
    of the best fit, the fewest changed toggles, then the best fit."""
    evaluated = _shortlist(spec, [dict(zip(space, combo)) for combo in itertools.product(*space.values())], start,
                           judges.screen, judges.many, screening)
    evaluated = evaluated + [start] * all(c["toggles"] for c in evaluated)  # as it is: always a candidate
    top = min(c["fit"] for c in evaluated)
    return min((c for c in evaluated if c["fit"] <= top + MARGIN), key=lambda c: (len(c["toggles"]), c["fit"], _rank(c)))


def _greedy(spec, space: dict[str, list[str]], base: dict[str, str], judges: Judges, screening: list) -> dict:
    """Forward selection: add the one change that improves the fit most, while it improves it by more than MARGIN."""
    current: dict[str, str] = {}
    best = judges.many([current])[0]
    while True:
        trials = _shortlist(spec, [{**current, n: v} for n, vals in space.items() for v in vals if current.get(n, base.get(n)) != v],
                            best, judges.screen, judges.many, screening)
        cand = min(trials, key=lambda c: (c["fit"], _rank(c)), default=None)
        if cand is None or cand["fit"] > best["fit"] - MARGIN:
            return best
        best, current = cand, dict(cand["toggles"])


def _ablation(best: dict, evaluate_many) -> list[dict]:
    """Remove-one ablation of the chosen setting, the toggle whose removal costs most first."""
    ablation = []
    withouts = evaluate_many([{k: v for k, v in best["toggles"].items() if k != n} for n in best["toggles"]])
    for n, w in zip(best["toggles"], withouts):
        ablation.append({"toggle": n, "value": best["toggles"][n], "score_without": w["score"], "delta": w["fit"] - best["fit"],
                         "first_above_floor_without": w["first_above_floor"], "entry": w})
    ablation.sort(key=lambda a: -a["delta"])
    return ablation


def _diagnosis(question: Question, best: dict, baseline: dict, parts: list[dict]) -> str:
    """The search's answer in one sentence."""
    who, at_floor, settings = question.who, best["first_above_floor"] is None, label(best["toggles"])
    if not best["toggles"] and at_floor:
        return f"implementation {who} agrees with the reference as it is: nothing above the noise floor, and no toggle setting does better"
    if not best["toggles"]:
        return (f"implementation {who}: no tried toggle setting explains the divergence; it first rises above the floor at "
                f"{baseline['first_above_floor']} (up to {multiple(baseline['max_ratio_to_floor'])} the floor)")
    sentence = (f"implementation {who} behaves like the reference with {settings}" if question.side == "reference" else
                f"implementation {who} matches the reference once {settings} is applied to it")
    sentence += ("; with these settings every capture point is within the noise floor" if at_floor else
                 f", but a residual remains: first above the floor at {best['first_above_floor']} "
                 f"(up to {multiple(best['max_ratio_to_floor'])} the floor)")
    return sentence + "".join(_explain(question.spec, p) for p in parts)


def _explain(spec, part: dict) -> str:
    """'. {field:x=ignored}: as if it ignored x (...), also spelled {y=1}' for one chosen toggle."""
    chosen = {part["toggle"]: part["value"]}
    others = [label(s) for s in part["spellings"][1:]]
    what = describe_setting(spec, chosen)[0] if is_field(part["toggle"]) else None
    if what is None and not others:
        return ""
    text = f". {label(chosen)}" + (f": {what}" if what else "")
    return text + (f"; the same explanation, spelled otherwise: {', '.join(others)}" if others else "")
