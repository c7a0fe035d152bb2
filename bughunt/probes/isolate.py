"""The isolated-layers probe (--isolate): each candidate that can is run once more with every decoder layer fed the
reference's input to that layer, so each layer's own error shows without the error it inherits (PyTorch Numeric
Suite's shadow comparison). Runners with `accepts_feed` take the feed."""

from __future__ import annotations


from bughunt import metrics, points as P, progress
from bughunt.findings import Finding
from bughunt.implementations import runner_class
from bughunt.probes import FlagProbe, ProbeOptions


class Options(ProbeOptions):
    isolate_layers: bool = False


def isolated_comparison(trace, reference, floor: dict, factor: float) -> dict:
    """Per point, judged against the same floor (the accumulated one, so conservative at depth);
    `layers_above_floor` lists the decoder layers whose own error rises above it."""
    from bughunt.judging import judge

    points, first = judge(metrics.compare_traces(trace, reference), floor, factor)
    above = [p["point"] for p in points if p["above_floor"] and P.is_layer_output(p["point"])]
    return {"points": points, "first_above_floor": first, "layers_above_floor": above}


def isolated_finding(label: str, iso: dict) -> Finding:
    layers = iso["layers_above_floor"]
    if not layers:
        text = "no decoder layer departs on its own: any divergence is inherited from before the first layer or after the last"
    else:
        one = len(layers) == 1
        text = f"{'only ' if one else ''}{', '.join(layers)} depart{'s' if one else ''} on {'its' if one else 'their'} own"
    return Finding("info", "isolated", f"{label} with each decoder layer fed the reference's input (--isolate): {text}"
                   + (f"; first point above the floor in isolation: {iso['first_above_floor']}" if iso["first_above_floor"] else "")
                   + ".", label, layers[0] if layers else None)


class Isolate(FlagProbe):
    name = "isolate"
    Options = Options
    flag = "--isolate"
    help = ("also run each candidate that can (hf, reference) with every decoder layer fed the reference's input to "
            "that layer, so each layer's own error shows without the error it inherits; the report draws "
            "accumulated and isolated error side by side")
    template = "sections/isolated.html"
    title = "Isolated layers"

    def report(self, result_data: dict, images: dict[str, str]) -> dict | None:
        if not images.get("isolated"):
            return None
        return {"comparisons": [c for c in result_data["comparisons"] if c.get("isolated")], "image": images["isolated"]}

    def after_all(self, ctx, traces) -> None:
        """Each candidate that ran, again with every layer fed the reference's input; entries say whether (or why not)."""
        from bughunt.execute import run_trace, trace_job

        ref = ctx.plan.reference
        if ref.label not in traces:
            return
        isolated = ctx.records.setdefault(self.name, {})
        for index, choice in enumerate(ctx.plan.choices):
            entry = ctx.entries[choice.label]
            if choice is ref or entry.status != "ok":
                continue
            cls = runner_class(choice.name)
            if not cls.accepts_feed:
                reason = getattr(cls, "feed_refusal", f"{choice.name} offers no seam to feed a decoder layer its input")
                entry.extra["isolated_layers"] = {"status": "unsupported", "reason": reason}
                continue
            try:
                with progress.task(f"{choice.label} isolated", unit="step") as bar:
                    bar.update(stage="each layer fed the reference's input")
                    job = trace_job(ctx, index, stem=ctx.scratch / f"isolated{index}", feed=traces[ref.label].stem,
                                     check_weights=False)
                    isolated[choice.label] = run_trace(ctx.load(choice), job, ctx.pool_for(choice), ctx.plan.options.timeout)
                entry.extra["isolated_layers"] = {"status": "ok"}
            except Exception as e:  # noqa: BLE001 - the accumulated comparison stands; the isolated one is reported missing
                entry.extra["isolated_layers"] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}

    def attach(self, data: dict, ctx) -> list[Finding]:
        isolated = ctx.records.get(self.name, {})
        for entry in data["implementations"]:  # the entries were written before after_all ran
            extra = ctx.entries[entry["label"]].extra.get("isolated_layers")
            if extra:
                entry["isolated_layers"] = extra
        reference, out = ctx.traces[ctx.plan.reference.label], []
        for c in data["comparisons"]:
            if c["candidate"] in isolated:
                floor = data["noise_floor"][c["dtype"]]
                c["isolated"] = isolated_comparison(isolated[c["candidate"]], reference, floor, ctx.plan.options.floor_factor)
                out.append(isolated_finding(c["candidate"], c["isolated"]))
        return out


PROBE = Isolate()
