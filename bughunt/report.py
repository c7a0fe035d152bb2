"""Plots and the self-contained HTML report, rendered from a Result alone (so any run can be re-rendered)."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

from bughunt.result import Result
from bughunt.trace import is_residual_point, point_order

_BAND_COLORS = {"fp32": "#9ecae1", "bf16": "#fdae6b", "fp16": "#a1d99b", "fp64": "#bdbdbd"}
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(point: str) -> str:
    return point.replace("layer.", "L")


def layer_figure(result: Result, title: str | None = None):
    """x = residual-stream capture point (embed, layer.0..N-1, final_norm), y = log10 L2 of the difference to
    the reference; one line per implementation; the noise floor drawn as a band from the floor to the
    finding threshold (floor x factor)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    comps = result.comparisons
    points = [p["point"] for p in comps[0]["points"] if is_residual_point(p["point"])] if comps else []
    xs = list(range(len(points)))
    factor = result.data["settings"]["floor_factor"]
    for dtype, floor in result.data.get("noise_floor", {}).items():
        lo, hi = [], []
        for p in points:
            f = floor["points"].get(p)
            val = f["floor_rel_l2"] * f["ref_norm"] if f and f["ref_norm"] > 0 else float("nan")
            lo.append(math.log10(val) if val > 0 else float("nan"))
            hi.append(math.log10(val * factor) if val > 0 else float("nan"))
        band = _BAND_COLORS.get(dtype, "#bdbdbd")
        ax.fill_between(xs, lo, hi, color=band, alpha=0.35, step=None, label=f"{dtype} noise floor .. x{factor:g}")
        ax.plot(xs, lo, color=band, lw=1, ls=":")
    for i, c in enumerate(comps):
        by = {p["point"]: p for p in c["points"]}
        ys = [by[p]["log10_l2"] if by.get(p) and by[p].get("log10_l2") is not None else float("nan") for p in points]
        color = _COLORS[i % len(_COLORS)]
        ax.plot(xs, ys, marker="o", ms=3.5, lw=1.6, color=color, label=c["candidate"])
        first = c.get("first_above_floor")
        if first in points:
            j = points.index(first)
            ax.annotate("first above floor", (j, ys[j]), textcoords="offset points", xytext=(6, 10), fontsize=8, color=color,
                        arrowprops={"arrowstyle": "->", "color": color, "lw": 0.8})
    ax.set_xticks(xs)
    ax.set_xticklabels([_short(p) for p in points], rotation=45 if len(points) > 14 else 0, fontsize=8)
    ax.set_xlabel("capture point (residual stream)")
    ax.set_ylabel(f"log10 L2 of difference to {result.data['settings']['reference']}")
    ax.set_title(title or f"{result.data['checkpoint']['spec']['family']}: per-layer divergence")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def position_figure(result: Result):
    """log10 L2 per position at the last decoder layer, one line per implementation."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 3.2), dpi=110)
    for i, c in enumerate(result.comparisons):
        layers = [p for p in c["points"] if is_residual_point(p["point"]) and p["point"].startswith("layer.") and "per_position" in p]
        if not layers:
            continue
        last = max(layers, key=lambda p: point_order(p["point"]))
        ys = [v if v is not None else float("nan") for v in last["per_position"]["log10_l2"]]
        ax.plot(range(len(ys)), ys, marker=".", lw=1.2, color=_COLORS[i % len(_COLORS)], label=f"{c['candidate']} ({last['point']})")
    ax.set_xlabel("position")
    ax.set_ylabel("log10 L2")
    ax.set_title("divergence by position at the last layer")
    ax.grid(alpha=0.3)
    if result.comparisons:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def heatmap_figure(result: Result, max_panels: int = 4):
    """Layer x position heatmap of log10 L2 per position, one panel per implementation (the first few)."""
    import numpy as np

    plt = _plt()
    comps = [c for c in result.comparisons if any("per_position" in p for p in c["points"])][:max_panels]
    n = max(1, len(comps))
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.2 + 1.9 * n), dpi=110, squeeze=False)
    for ax, c in zip(axes[:, 0], comps):
        rows = [p for p in c["points"] if is_residual_point(p["point"]) and "per_position" in p]
        grid = np.array([[v if v is not None else np.nan for v in p["per_position"]["log10_l2"]] for p in rows], dtype=float)
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([_short(p["point"]) for p in rows], fontsize=7)
        ax.set_title(f"{c['candidate']}: log10 L2 by capture point and position", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    axes[-1, 0].set_xlabel("position")
    fig.tight_layout()
    return fig


def isolation_figure(result: Result):
    """Accumulated and isolated error side by side (--isolate): left, log10 L2 per residual point as the candidate ran;
    right, the same with every decoder layer fed the reference's input. A bug in one layer is a ramp on the left and a
    single spike on the right."""
    plt = _plt()
    comps = [c for c in result.comparisons if c.get("isolated")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110, sharey=True)
    for ax, key, title in ((axes[0], None, "accumulated (as run)"), (axes[1], "isolated", "isolated (each layer fed the reference's input)")):
        for i, c in enumerate(comps):
            pts = [p for p in (c[key]["points"] if key else c["points"]) if is_residual_point(p["point"])]
            ys = [p["log10_l2"] if p.get("log10_l2") is not None else float("nan") for p in pts]
            ax.plot(range(len(pts)), ys, marker="o", ms=3.5, lw=1.6, color=_COLORS[i % len(_COLORS)], label=c["candidate"])
            above = [j for j, p in enumerate(pts) if p.get("above_floor")]
            ax.scatter(above, [ys[j] for j in above], s=40, facecolors="none", edgecolors=_COLORS[i % len(_COLORS)])
            ax.set_xticks(range(len(pts)))
            ax.set_xticklabels([_short(p["point"]) for p in pts], rotation=45 if len(pts) > 14 else 0, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"log10 L2 of difference to {result.data['settings']['reference']}")
    axes[1].legend(fontsize=8, loc="best", title="circled: above the floor", title_fontsize=7)
    fig.tight_layout()
    return fig


def _loss_points(result: Result) -> list[tuple[dict, dict]]:
    """(comparison, its logits point) for every comparison whose logits carry the loss on the input."""
    out = []
    for c in result.comparisons:
        p = next((p for p in c["points"] if p["point"] == "logits" and p.get("delta_nll_per_position")), None)
        if p is not None:
            out.append((c, p))
    return out


def loss_figure(result: Result):
    """Delta NLL (candidate minus reference, nats) of each actual next token by position, one line per implementation;
    the band is +-factor x the dtype's loss floor (symmetric log scale, linear inside the smallest floor)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 3.4), dpi=110)
    factor = result.data["settings"]["floor_factor"]
    rows = _loss_points(result)
    floors = [p["floor_delta_nll"] for _, p in rows if p.get("floor_delta_nll")]
    for i, (c, p) in enumerate(rows):
        ys = [v if v is not None else float("nan") for v in p["delta_nll_per_position"]]
        xs = list(range(1, len(ys) + 1))  # position t's logits predict token t + 1
        color = _COLORS[i % len(_COLORS)]
        ax.plot(xs, ys, marker=".", lw=1.2, color=color,
                label=f"{c['candidate']} (mean {p['delta_nll']:+.1e}, ppl x{p['ppl_ratio']:.6g})" if p.get("ppl_ratio") else c["candidate"])
        if p.get("floor_delta_nll"):
            band = _BAND_COLORS.get(c["dtype"], "#bdbdbd")
            ax.fill_between(xs, [-factor * p["floor_delta_nll"]] * len(xs), [factor * p["floor_delta_nll"]] * len(xs),
                            color=band, alpha=0.2, lw=0)
        if p.get("first_position_nll_above_floor") is not None:
            ax.axvline(p["first_position_nll_above_floor"] + 1, color=color, ls=":", lw=1)
    if floors:
        ax.set_yscale("symlog", linthresh=min(floors))
    ax.axhline(0, color="#444", lw=0.6)
    ax.set_xlabel("position of the predicted token")
    ax.set_ylabel("delta NLL (nats)")
    ax.set_title(f"loss on the input: candidate minus {result.data['settings']['reference']} (band: {factor:g}x the loss floor)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _encode(fig, svg: bool = False) -> tuple[bytes, str | None]:
    """PNG bytes, and the SVG text only when asked (only the per-layer plot is written as SVG)."""
    png = io.BytesIO()
    fig.savefig(png, format="png")
    text = None
    if svg:
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
        text = buf.getvalue()
    _plt().close(fig)
    return png.getvalue(), text


def decode_figure(result: Result):
    """Relative L2 of the logits at each decoding step: incremental vs the implementation's own full pass, and vs
    the reference's decoding when there is one; the first departing step marked."""
    plt = _plt()
    d = result.data["decode"]
    fig, ax = plt.subplots(figsize=(9, 3.4), dpi=110)
    steps = d["steps"][d["prefill"]:]
    series = [("incremental vs own full pass", d["self"]), (f"vs {d['reference']['label']}", d["reference"])] if "reference" in d \
        else [("incremental vs own full pass", d["self"])]
    for i, (label, s) in enumerate(series):
        ys = [s["rel_l2"][t] if s["rel_l2"][t] and s["rel_l2"][t] > 0 else float("nan") for t in steps]
        ax.semilogy(steps, ys, marker="o", ms=3, color=_COLORS[i], label=label)
        if s["first_departing_step"] is not None:
            ax.axvline(s["first_departing_step"], color=_COLORS[i], ls=":", lw=1)
    ax.set_xlabel("decoding step (position)")
    ax.set_ylabel("relative L2 of logits")
    ax.set_title(f"{d['candidate']}: {d['path']} decoding after a prefill of {d['prefill']}")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def render(result: Result, out: Path) -> dict[str, Path]:
    """Write the plots (layers.png/.svg, positions.png, heatmap.png and, with the loss on the input, loss.png for
    comparisons; decode.png for decode runs) and report.html into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, bytes] = {}
    written = {"html": out / "report.html"}
    if result.comparisons:
        png, svg = _encode(layer_figure(result), svg=True)
        (out / "layers.png").write_bytes(png)
        (out / "layers.svg").write_text(svg)
        images["layers"] = png
        written.update(png=out / "layers.png", svg=out / "layers.svg")
        images["positions"], _ = _encode(position_figure(result))
        (out / "positions.png").write_bytes(images["positions"])
        images["heatmap"], _ = _encode(heatmap_figure(result))
        (out / "heatmap.png").write_bytes(images["heatmap"])
        if _loss_points(result):
            images["loss"], _ = _encode(loss_figure(result))
            (out / "loss.png").write_bytes(images["loss"])
    if any(c.get("isolated") for c in result.comparisons):
        images["isolated"], _ = _encode(isolation_figure(result))
        (out / "isolated.png").write_bytes(images["isolated"])
    if result.data.get("decode"):
        images["decode"], _ = _encode(decode_figure(result))
        (out / "decode.png").write_bytes(images["decode"])
    (out / "report.html").write_text(render_html(result, images))
    return written


def _fmt(v, spec: str = ".2e") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def render_html(result: Result, images: dict[str, bytes]) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("bughunt", "templates"), autoescape=jinja2.select_autoescape(["html"]))
    env.filters["fmt"] = _fmt
    env.filters["short"] = _short
    template = env.get_template("report.html")
    b64 = {k: base64.b64encode(v).decode() for k, v in images.items()}
    sections = [{"title": s["title"], "html": safe_section_html(s["html"])} for s in result.data.get("extra_sections", [])]
    if result.data.get("sweep"):
        sections.insert(0, {"title": "Sweep", "html": sweep_section(result)})
    if images.get("isolated"):
        sections.append({"title": "Isolated layers", "html": isolated_section(result, b64["isolated"])})
    checks = [e["meta"]["weight_check"] for e in result.data.get("implementations", []) if (e.get("meta") or {}).get("weight_check")]
    if checks:
        sections.append({"title": "Weights", "html": weights_section(checks)})
    if result.data.get("generation"):
        sections.insert(0, {"title": "Greedy generation", "html": generation_section(result)})
    return template.render(r=result.data, images=b64, extra_sections=sections)


# What a report section written by bughunt contains; anything else in a section read from result.json is dropped.
SECTION_TAGS = {"a", "b", "br", "code", "details", "div", "em", "h3", "h4", "i", "li", "ol", "p", "pre", "span",
                "strong", "summary", "table", "tbody", "td", "th", "thead", "tr", "ul"}
SECTION_ATTRIBUTES = {"*": {"class", "title", "colspan", "rowspan"}, "a": {"href"}}


def safe_section_html(fragment: str) -> str:
    """An extra section's HTML with scripts, event handlers, styles and other URL schemes removed. Sections are
    stored in result.json as HTML, and `bughunt render` may be given a result.json from anyone: a report must never
    run what such a file carries."""
    import nh3

    return nh3.clean(str(fragment), tags=SECTION_TAGS, attributes=SECTION_ATTRIBUTES, url_schemes={"http", "https"},
                     link_rel="noopener noreferrer")


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
    chosen = None
    if sw.get("search"):
        best = sw["search"]["best"]
        chosen = "{" + ", ".join(f"{k}={v}" for k, v in best.items()) + "}" if best else "{}"
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


def sweep_section(result: Result) -> str:
    """The sweep's diagnosis, ablation and every configuration's per-layer curve (log10 L2 per residual point)."""
    import html

    sw = result.data["sweep"]
    e = html.escape
    parts = [f"<p>mode <b>{e(sw['mode'])}</b>, toggles applied to the <b>{e(sw['side'])}</b> side; candidate <b>{e(sw['candidate'])}</b>, "
             f"reference <b>{e(sw['reference'])}</b>.</p>"]
    s = sw.get("search")
    if s:
        parts.append(f"<div class='finding {'info' if s['at_floor'] else 'warning'}'><b>diagnosis</b>: {e(s['diagnosis'])}</div>")
        from bughunt.sweep import search_counts

        parts.append(f"<p>search: {e(search_counts(s))}; "
                     f"fit {s['baseline_fit']:.2f} as is, {s['best_fit']:.2f} with the best settings (mean log10 of rel L2 / floor).</p>")
        for x in s.get("explanations") or []:
            spellings = " = ".join(e("{" + ", ".join(f"{k}={v}" for k, v in sp.items()) + "}") for sp in x["spellings"])
            parts.append(f"<p><b>{e(x['toggle'])}={e(x['value'])}</b>: {e(x.get('description') or '')}"
                         + (f"<br>spellings of the same explanation: {spellings}" if len(x["spellings"]) > 1 else "") + "</p>")
        if s["ablation"]:
            rows = "".join(f"<tr><td class='l'>{e(a['toggle'])}={e(a['value'])}</td><td>{a['delta']:.2f}</td>"
                           f"<td class='l'>{e(a['first_above_floor_without'] or 'none')}</td></tr>" for a in s["ablation"])
            parts.append("<table><tr><th class='l'>remove</th><th>fit worse by (decades)</th><th class='l'>first above floor without it</th></tr>"
                         f"{rows}</table>")
    points = list(next(iter(sw["configurations"]))["curve"]) if sw["configurations"] else []
    head = "".join(f"<th>{e(_short(p))}</th>" for p in points)
    rows = []
    for c in group_configurations(sw):
        cells = "".join(f"<td>{_fmt(c['curve'].get(p), '.2f')}</td>" for p in points)
        label = "<br>= ".join(e(x) for x in c["labels"])
        if c["chosen"]:
            label = f"<b>&#9654; {label}</b> (chosen)"
        rows.append(f"<tr><td class='l'>{label}</td><td>{c['score']:.3f}</td><td class='l'>{e(c['first_above_floor'] or 'none')}</td>{cells}</tr>")
    parts.append("<details><summary>every configuration's per-layer curve (log10 L2); settings that give the same divergence "
                 "share a row</summary><table><tr><th class='l'>toggles</th>"
                 f"<th>score</th><th class='l'>first above floor</th>{head}</tr>{''.join(rows)}</table></details>")
    return "".join(parts)


def weights_section(checks: list[dict]) -> str:
    """Each implementation's loaded parameters against the checkpoint (bughunt/weightcheck.py): a count per relation
    and every parameter that departs."""
    import html

    e = html.escape
    parts = ["<p>Each parameter an implementation loaded, back in the checkpoint's layout, against the checkpoint's tensor "
             "(the checkpoint rounded to the implementation's dtype counts as identical).</p>"]
    for wc in checks:
        if wc.get("error"):
            parts.append(f"<div class='finding info'><b>{e(wc['implementation'])}</b>: the weight check could not run: {e(wc['error'])}</div>")
            continue
        counts = ", ".join(f"{e(k)}: {v}" for k, v in sorted(wc["counts"].items()))
        parts.append(f"<div class='finding {'warning' if wc['rows'] else 'info'}'>{e(wc['summary'])} ({counts})</div>")
        if wc["rows"]:
            rows = "".join(f"<tr><td class='l'>{e(r['name'])}</td><td class='l'>{e(r['relation'])}</td><td>{_fmt(r['max_abs'])}</td>"
                           f"<td>{_fmt(r['max_rel'])}</td><td class='l'>{e(r['detail'])}</td></tr>" for r in wc["rows"])
            parts.append("<details><summary>parameters that depart</summary><table><tr><th class='l'>parameter</th>"
                         "<th class='l'>relation</th><th>max abs</th><th>max rel</th><th class='l'>detail</th></tr>"
                         f"{rows}</table></details>")
    return "".join(parts)


def isolated_section(result: Result, png_b64: str) -> str:
    """--isolate: the side-by-side plot and, per candidate, the decoder layers whose own error rises above the floor."""
    import html

    e = html.escape
    rows = "".join(f"<tr><td class='l'>{e(c['candidate'])}</td><td class='l'>{e(c['first_above_floor'] or 'none')}</td>"
                   f"<td class='l'>{e(c['isolated']['first_above_floor'] or 'none')}</td>"
                   f"<td class='l'>{e(', '.join(c['isolated']['layers_above_floor']) or 'none')}</td></tr>"
                   for c in result.comparisons if c.get("isolated"))
    return ("<p>Each candidate run once more with every decoder layer fed the reference's input to that layer (PyTorch "
            "Numeric Suite's shadow comparison): a layer's own error, without the error it inherits. Judged against the "
            "same floor as the accumulated run.</p>"
            f"<img alt='accumulated and isolated error' src='data:image/png;base64,{png_b64}'>"
            "<table><tr><th class='l'>candidate</th><th class='l'>first above floor (accumulated)</th>"
            f"<th class='l'>first above floor (isolated)</th><th class='l'>layers above floor on their own</th></tr>{rows}</table>")


def generation_section(result: Result) -> str:
    """Each implementation's greedy tokens beside the reference's (differences marked), and at the first differing
    step the top-k containment check, the log-prob gaps and the reference's top-2 margin."""
    import html

    g = result.data["generation"]
    e = html.escape
    ref = g.get("reference")
    parts = [f"<p>{g['steps']} tokens generated greedily after the {g['prompt_length']}-token input, each implementation through its "
             f"own generation path; top-k check with k = {g['top_k']} (as vLLM's model tests gate: where the tokens first differ, "
             "each must be within the other's top-k)"
             + (f"; decode-only config on the candidates: <code>{e(str(g['decode_config']))}</code>" if g.get("decode_config") else "")
             + ".</p>"]
    if ref is None:
        return "".join(parts) + "<p class='failed'>the reference could not generate.</p>"

    def tokens_row(label: str, path: str, rows: list[list[int]], against: list[list[int]] | None) -> str:
        cells = []
        for t, tok in enumerate(rows[0]):
            differs = against is not None and tok != against[0][t]
            style = " style='background:#ffd6d2'" if differs else ""
            cells.append(f"<td{style}>{tok}</td>")
        return f"<tr><td class='l'>{e(label)}</td><td class='l'>{e(path)}</td>{''.join(cells)}</tr>"

    head = "".join(f"<th>{t}</th>" for t in range(g["steps"]))
    rows = [tokens_row(ref["label"], ref["path"], ref["tokens"], None)]
    rows += [tokens_row(c["candidate"], c["path"], c["tokens"], ref["tokens"]) for c in g["candidates"]]
    margin = "".join(f"<td>{m:.2g}</td>" for m in ref["margins"][0])
    parts.append(f"<table><tr><th class='l'>implementation</th><th class='l'>path</th>{head}</tr>{''.join(rows)}"
                 f"<tr><td class='l' colspan=2>reference top-2 margin (nats)</td>{margin}</tr></table><p><small>First row of the batch; "
                 "a small margin is a near tie, where a correct implementation at a lower precision may flip.</small></p>")
    checks = []
    for c in g["candidates"]:
        for b, r in enumerate(c["rows"]):
            if r["first_diff"] is None:
                checks.append(f"<tr><td class='l'>{e(c['candidate'])}</td><td>{b}</td><td class='l' colspan=7>identical to the reference</td></tr>")
                continue
            checks.append(f"<tr class='{'' if r['topk_ok'] else 'first'}'><td class='l'>{e(c['candidate'])}</td><td>{b}</td><td>{r['step']}</td>"
                          f"<td>{r['candidate_token']} / {r['reference_token']}</td><td>{r['candidate_rank_under_reference'] + 1}</td>"
                          f"<td>{r['reference_rank_under_candidate'] + 1}</td><td>{r['reference_gap']:.3g} / {r['candidate_gap']:.3g}</td>"
                          f"<td>{r['reference_margin']:.3g}</td><td class='l'>{'pass' if r['topk_ok'] else 'FAIL'}</td></tr>")
    parts.append("<table><tr><th class='l'>candidate</th><th>row</th><th>first differing step</th><th>token cand / ref</th>"
                 "<th>rank of cand's token under ref</th><th>rank of ref's token under cand</th><th>log-prob gap ref / cand</th>"
                 f"<th>ref top-2 margin</th><th class='l'>top-{g['top_k']} check</th></tr>{''.join(checks)}</table>")
    sources = "; ".join(f"{e(c['candidate'])}: {e(c['logits_source'])}" for c in g["candidates"])
    if sources:
        parts.append(f"<p><small>Per-step log-probs: {sources}.</small></p>")
    for label, error in (g.get("failed") or {}).items():
        parts.append(f"<p class='failed'>{e(label)} could not generate: {e(error)}</p>")
    return "".join(parts)
