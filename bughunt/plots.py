"""The report's plots: matplotlib figures drawn from a Result alone (per-layer and per-position divergence, the
layer x position heatmap, isolated layers, loss on the input, decoding steps), encoded as PNG (and SVG)."""

from __future__ import annotations

import io
import math
from pathlib import Path

from bughunt.result import Result
from bughunt.trace import is_residual_point, point_order
from bughunt import points as P

_BAND_COLORS = {"fp32": "#9ecae1", "bf16": "#fdae6b", "fp16": "#a1d99b", "fp64": "#bdbdbd"}
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def short_point(point: str) -> str:
    """A capture point's name on an axis or in a table head: layer.3 -> L3."""
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
    ax.set_xticklabels([short_point(p) for p in points], rotation=45 if len(points) > 14 else 0, fontsize=8)
    ax.set_xlabel("capture point (residual stream)")
    ax.set_ylabel(f"log10 L2 of difference to {result.data['settings']['reference']}")
    ax.set_title(title or f"{result.data['checkpoint']['spec']['family']}: per-layer divergence")
    return _finish(fig, ax)


def _finish(fig, ax):
    """The common end of a one-panel figure: a light grid, a legend when something is labelled, a tight layout."""
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def position_figure(result: Result):
    """log10 L2 per position at the last decoder layer, one line per implementation."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 3.2), dpi=110)
    for i, c in enumerate(result.comparisons):
        layers = [p for p in c["points"] if P.is_layer_output(p["point"]) and "per_position" in p]
        if not layers:
            continue
        last = max(layers, key=lambda p: point_order(p["point"]))
        ys = [v if v is not None else float("nan") for v in last["per_position"]["log10_l2"]]
        ax.plot(range(len(ys)), ys, marker=".", lw=1.2, color=_COLORS[i % len(_COLORS)], label=f"{c['candidate']} ({last['point']})")
    ax.set_xlabel("position")
    ax.set_ylabel("log10 L2")
    ax.set_title("divergence by position at the last layer")
    return _finish(fig, ax)


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
        ax.set_yticklabels([short_point(p["point"]) for p in rows], fontsize=7)
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
            ax.set_xticklabels([short_point(p["point"]) for p in pts], rotation=45 if len(pts) > 14 else 0, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"log10 L2 of difference to {result.data['settings']['reference']}")
    axes[1].legend(fontsize=8, loc="best", title="circled: above the floor", title_fontsize=7)
    fig.tight_layout()
    return fig


def loss_points(result: Result) -> list[tuple[dict, dict]]:
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
    rows = loss_points(result)
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
    return _finish(fig, ax)


def encode(fig, svg: bool = False) -> tuple[bytes, str | None]:
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
    return _finish(fig, ax)


def write_plots(result: Result, out: Path) -> tuple[dict[str, bytes], dict[str, Path]]:
    """Write the plots into `out`: layers.png/.svg, positions.png, heatmap.png and, with the loss on the input, loss.png
    for comparisons; isolated.png with --isolate; decode.png for decode runs. Returns each plot's PNG bytes by name
    (for the report to embed) and the files worth naming."""
    images: dict[str, bytes] = {}
    written: dict[str, Path] = {}
    if result.comparisons:
        png, svg = encode(layer_figure(result), svg=True)
        (out / "layers.png").write_bytes(png)
        (out / "layers.svg").write_text(svg)
        images["layers"] = png
        written.update(png=out / "layers.png", svg=out / "layers.svg")
        images["positions"], _ = encode(position_figure(result))
        (out / "positions.png").write_bytes(images["positions"])
        images["heatmap"], _ = encode(heatmap_figure(result))
        (out / "heatmap.png").write_bytes(images["heatmap"])
        if loss_points(result):
            images["loss"], _ = encode(loss_figure(result))
            (out / "loss.png").write_bytes(images["loss"])
    if any(c.get("isolated") for c in result.comparisons):
        images["isolated"], _ = encode(isolation_figure(result))
        (out / "isolated.png").write_bytes(images["isolated"])
    if result.data.get("decode"):
        images["decode"], _ = encode(decode_figure(result))
        (out / "decode.png").write_bytes(images["decode"])
    return images, written
