"""The self-contained HTML report, rendered from a Result alone (so any run can be re-rendered): the plots come from
bughunt/plots.py, and each section's plain data is handed to its Jinja template under bughunt/templates/sections/."""

from __future__ import annotations

import base64
from functools import lru_cache
from pathlib import Path

from bughunt.numbers import multiple
from bughunt.plots import short_point, write_plots
from bughunt.result import Result


def render(result: Result, out: Path) -> dict[str, Path]:
    """Write the plots (see plots.write_plots) and report.html into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, written = write_plots(result, out)
    (out / "report.html").write_text(render_html(result, images))
    return {"html": out / "report.html", **written}


def render_html(result: Result, images: dict[str, bytes]) -> str:
    """report.html for `result`, with the plots' PNG bytes (by name) embedded."""
    b64 = {k: base64.b64encode(v).decode() for k, v in images.items()}
    return render_template("report.html", r=result.data, images=b64, sections=sections(result.data, b64))


def render_template(name: str, **context) -> str:
    """A template under bughunt/templates/ rendered with `context` (autoescaped)."""
    return _environment().get_template(name).render(**context)


@lru_cache(maxsize=1)
def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("bughunt", "templates"), autoescape=jinja2.select_autoescape(["html"]))
    env.filters.update(fmt=_fmt, number=_number, short=short_point,
                       multiple=lambda v: multiple(None if isinstance(v, jinja2.Undefined) else v))  # absent: '–' 
    return env


def _fmt(v, spec: str = ".2e") -> str:
    """A metric in a table cell: '–' for none, yes/no for a flag, a float by `spec`."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _number(v, spec: str) -> str:
    """Any number by `spec` (as an f-string would), '–' for none."""
    return "–" if v is None else format(v, spec)


# ---- sections: a title, a template under templates/sections/ and the plain data it reads ------------------------


def sections(data: dict, images: dict[str, str]) -> list[dict]:
    """The report's sections after the plots, in order: sweep, decode, the HTML sections stored in the result
    (sanitized), then each probe's (bughunt/probes: generation, isolated layers, weights, logit lens, ...). Each is
    {"title", "template", "data"}; report.html includes the template with `data` set."""
    from bughunt import probes

    out: list[dict] = []

    def add(title: str, name: str, view) -> None:
        out.append({"title": title, "template": f"sections/{name}.html", "data": view})

    if data.get("sweep"):
        add("Sweep", "sweep", sweep_view(data["sweep"]))
    if data.get("decode"):
        add("Decode consistency", "decode", decode_view(data["decode"], data["settings"]["floor_factor"]))
    for s in stored_sections(data):
        add(s["title"], "stored_html", {"html": safe_section_html(s["html"])})
    if data.get("ci_gate"):
        add("CI gate", "ci_gate", data["ci_gate"])
    for probe in probes.registered():
        view = probe.report(data, images) if probe.template else None
        if view is not None:
            out.append({"title": probe.title, "template": probe.template, "data": view})
    return out


def stored_sections(data: dict) -> list[dict]:
    """The HTML sections an older result carries in extra_sections (before schema_version 3: ci's gate table; before 2:
    decode's section too). A schema_version 1 decode result's section is now drawn from its data, so the stored copy is
    dropped rather than shown twice."""
    legacy_decode = data.get("schema_version") == 1 and data.get("decode")
    return [s for s in data.get("extra_sections", []) if not (legacy_decode and s["title"] == "Decode consistency")]


# What a stored section may contain; anything else in a section read from result.json is dropped.
SECTION_TAGS = {"a", "b", "br", "code", "details", "div", "em", "h3", "h4", "i", "li", "ol", "p", "pre", "span",
                "strong", "summary", "table", "tbody", "td", "th", "thead", "tr", "ul"}
SECTION_ATTRIBUTES = {"*": {"class", "title", "colspan", "rowspan"}, "a": {"href"}}


def safe_section_html(fragment: str) -> str:
    """A stored section's HTML with scripts, event handlers, styles and other URL schemes removed. `bughunt render` may
    be given a result.json from anyone: a report must never run what such a file carries."""
    import nh3

    return nh3.clean(str(fragment), tags=SECTION_TAGS, attributes=SECTION_ATTRIBUTES, url_schemes={"http", "https"},
                     link_rel="noopener noreferrer")


def decode_view(d: dict, floor_factor: float) -> dict:
    """Decode consistency: the relative L2 of the logits at each step after the prefill, against the implementation's
    own full pass and against the reference's decoding when there is one."""
    ref = d.get("reference")
    rows = [{"step": t, "self": d["self"]["rel_l2"][t], "reference": ref["rel_l2"][t] if ref else None}
            for t in d["steps"][d["prefill"]:]]
    return {"decode": d, "reference": ref, "rows": rows, "floor_factor": floor_factor}


def sweep_view(sw: dict) -> dict:
    """The sweep: its search (diagnosis, counts, explanations, ablation) and every configuration's per-layer curve,
    settings with the same divergence merged into one row."""
    s = sw.get("search")
    explanations = [{**x, "spellings": [settings_label(sp) for sp in x["spellings"]]} for x in (s or {}).get("explanations") or []]
    return {"sweep": sw, "search": s, "explanations": explanations,
            "screen_depth": sorted({r["layers"] for r in (s or {}).get("screening") or []}),
            "points": list(sw["configurations"][0]["curve"]) if sw["configurations"] else [],
            "rows": group_configurations(sw)}


def settings_label(settings: dict) -> str:
    """A set of toggle settings as the sweep labels it: {gelu=exact, rope_dtype=model}."""
    return "{" + ", ".join(f"{k}={v}" for k, v in settings.items()) + "}"


def _same_curve(a: dict, b: dict) -> bool:
    ra, rb = a.get("rel_l2") or {}, b.get("rel_l2") or {}
    if ra.keys() != rb.keys() or not ra:
        return False
    return all((x is None and y is None) or (x is not None and y is not None and abs(x - y) <= 1e-9 * max(abs(x), abs(y), 1e-300))
               for x, y in ((ra[k], rb[k]) for k in ra))


def group_configurations(sw: dict) -> list[dict]:
    """The sweep's configurations, best score first, with the settings that gave the same divergence at every point
    merged into one row: one explanation, several spellings (e.g. {rope_theta=10000.0} and {rope_theta_source=default}).
    Each row: labels (the chosen or simplest spelling first), score, first_above_floor, curve, chosen (the search's pick)."""
    chosen = settings_label(sw["search"]["best"] or {}) if sw.get("search") else None
    rows: list[dict] = []
    for c in sorted(sw["configurations"], key=lambda c: (c["score"], len(c.get("toggles") or {}))):
        row = next((r for r in rows if _same_curve(r["entry"], c)), None)
        if row is None:
            rows.append({"labels": [c["label"]], "score": c["score"], "first_above_floor": c["first_above_floor"],
                         "curve": c["curve"], "chosen": c["label"] == chosen, "entry": c, "members": [c]})
        else:
            row["labels"].append(c["label"])
            row["members"].append(c)
            row["chosen"] = row["chosen"] or c["label"] == chosen
    for row in rows:  # a setting that only adds toggles with no effect to another in its row is not a spelling of its own
        sets = {lab: set(c.get("toggles", {}).items()) for c in row.pop("members") for lab in [c["label"]]}
        row["labels"] = [lab for lab in row["labels"] if not any(other < sets[lab] for o, other in sets.items() if o != lab)]
        if row["chosen"] and chosen not in row["labels"]:
            row["labels"].insert(0, chosen)
        if row["chosen"] and row["labels"][0] != chosen:
            row["labels"].remove(chosen)
            row["labels"].insert(0, chosen)
        del row["entry"]
    return rows
