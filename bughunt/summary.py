"""The terminal summary of a compare Result: per candidate, where it first departs and its headline figures, then the
findings and the memory plan. Printed by `bughunt compare` and `bughunt demo`."""

from __future__ import annotations

from bughunt.numbers import multiple


def format_summary(result) -> str:
    """The short terminal table: one row per candidate, naming the first capture point above the floor."""
    d = result.data
    lines = [f"{d['checkpoint']['spec']['family']} · {_named(d['checkpoint'])} · reference {d['settings']['reference']} · "
             f"floor factor {d['settings']['floor_factor']:g}"]
    text = d["inputs"].get("text")
    if text:
        shape = f"{len(d['inputs']['tokens'])} x {len(d['inputs']['tokens'][0])} ids"
        lines.append(f"  input: {text['kind']} ({shape}) through {text['tokenizer']}; {text['bos']}")
        for path, p in (text.get("paths") or {}).items():
            state = p["skipped"][:100] if "skipped" in p else "same ids" if p.get("agrees") else "DIFFERENT ids"
            lines.append(f"  tokenizer path {path}: {state}")
    lines += [f"  {f['severity'].upper()}: {f['message']}" for f in d["findings"] if f["kind"] in ("input", "tokenizer")]
    lines.append(f"  {'implementation':<28} {'dtype':<5} {'first above floor':<18} {'max vs floor':>12} {'max rel L2':>11} "
                 f"{'at':<12} {'logits KL':>10} {'top-1':>6}")
    for e in d["implementations"]:
        if e["label"] == d["settings"]["reference"]:
            continue
        if e["status"] != "ok":
            lines.append(f"  {e['label']:<28} {e['dtype']:<5} FAILED: {e['error'][:90]}")
            continue
        c = result.comparison(e["label"])
        s = c["summary"]
        fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
        ratios = [p["ratio_to_floor"] for p in c["points"] if p.get("ratio_to_floor") is not None]
        lines.append(f"  {e['label']:<28} {c['dtype']:<5} {c['first_above_floor'] or 'none':<18} "
                     f"{multiple(max(ratios, default=None)):>12} {fmt(s['max_rel_l2'], '.2e'):>11} "
                     f"{s['max_rel_l2_point'] or '–':<12} {fmt(s['logits_kl'], '.2e'):>10} {fmt(s['logits_top1'], '.3f'):>6}")
    from bughunt import probes

    for probe in probes.registered():  # each probe's own lines (generation, logit lens, ...)
        lines += [f"  {line}" for line in probe.summary(d)]
    for f in d["findings"]:
        if f["severity"] != "info" and f["kind"] not in ("input", "tokenizer"):  # those came first, above the numerics
            lines.append(f"  {f['severity'].upper()}: {f['message']}")
    if d.get("schedule"):
        sch = d["schedule"]
        lines.append(f"  memory plan: {'side by side' if sch['side_by_side'] else 'one after another'} within {sch['budget_gb']} GB "
                     f"({sch['budget_source']}{', ' + sch['reason'] if sch.get('reason') else ''}); estimated peaks " + ", ".join(f"{e['label']} ~{e['peak_gb']} GB" for e in sch["estimates"]))
    return "\n".join(lines)


def _named(checkpoint: dict) -> str:
    """The checkpoint as the user named it: the GGUF file, the hub id at its resolved revision, or the directory."""
    source = checkpoint.get("source") or {}
    if source.get("kind") == "gguf":
        return f"{source['file']} ({source['file_type']})"
    if source.get("kind") == "hub":
        return f"{source['hub_id']}@{source['revision'][:12]}"
    return checkpoint["path"]
