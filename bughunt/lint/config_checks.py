"""Lint checks of config.json alone: pad == eos, sliding windows and context lengths, activation fields, RoPE scaling."""

from __future__ import annotations

import math

from bughunt.lint.catalog import KNOWN_ROPE_TYPES, ROPE_EXTENDS_CONTEXT, ROPE_REQUIRED, _Context, Finding, _finding, _Skip
from bughunt.spec import _ACTIVATIONS


_PAD_HARM = ("harmless for a single unpadded sequence (every bughunt run); it bites when fine-tuning masks labels by pad "
             "id (EOS is never learned) and in padded batches")


def check_pad_equals_eos(ctx: _Context) -> list[Finding]:
    out = []
    pad, eos = ctx.spec.pad_token_id, ctx.eos_ids()
    if pad is not None and pad in eos:
        out.append(_finding("pad-equals-eos", f"config.json: pad_token_id={pad} is also an eos_token_id ({eos}); {_PAD_HARM}",
                            source="config.json", pad_token_id=pad, eos_token_id=eos))
    if any(n in ctx.tokenizer_files for n in ("tokenizer.json", "tokenizer.model")):
        try:
            tok = ctx.tokenizer
        except _Skip:
            return out
        if tok.pad_token_id is not None and tok.pad_token_id == tok.eos_token_id and not out:
            out.append(_finding("pad-equals-eos", f"tokenizer: pad_token {tok.pad_token!r} is the eos_token (id {tok.pad_token_id}); {_PAD_HARM}",
                                source="tokenizer", pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    return out


def _near_round(n: int) -> int | None:
    """The round number n is one less than (a power of two, or a multiple of 1000), if any."""
    m = n + 1
    if m >= 16 and (m & (m - 1) == 0 or m % 1000 == 0 or m % 1024 == 0):
        return m
    return None


def check_sliding_window(ctx: _Context) -> list[Finding]:
    w, maxpos = ctx.spec.sliding_window, ctx.spec.max_position_embeddings
    if w is None:
        raise _Skip("no layer uses a sliding window")
    out = []
    if (r := _near_round(w)) is not None:
        out.append(_finding("sliding-window-off-by-one", f"sliding_window is {w}, one less than {r}", sliding_window=w, round=r))
    if maxpos and w > maxpos:
        out.append(_finding("sliding-window-exceeds-context", f"sliding_window {w} > max_position_embeddings {maxpos}",
                            sliding_window=w, max_position_embeddings=maxpos))
    return out


def _rounded_decimal(n: int) -> int | None:
    """The power of two within 5% of n, when n is a multiple of 1000 (128000 -> 131072)."""
    if not isinstance(n, int) or n < 1000 or n % 1000:
        return None
    p = 2 ** round(math.log2(n))
    return p if p != n and abs(p - n) / p <= 0.05 else None


def _rope_param_sets(cfg: dict) -> list[tuple[str, dict]]:
    """Every RoPE parameter dict in the raw config, labelled by where it sits."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and any(isinstance(v, dict) for v in rp.values()):
        return [(f"rope_parameters.{k}", v) for k, v in rp.items() if isinstance(v, dict)]
    if isinstance(rp, dict):
        return [("rope_parameters", rp)]
    rs = cfg.get("rope_scaling")
    return [("rope_scaling", rs)] if isinstance(rs, dict) else []


def check_max_position(ctx: _Context) -> list[Finding]:
    out = []
    fields = [("max_position_embeddings", ctx.cfg.get("max_position_embeddings")),
              ("original_max_position_embeddings", ctx.cfg.get("original_max_position_embeddings"))]
    fields += [(f"{label}.original_max_position_embeddings", p.get("original_max_position_embeddings"))
               for label, p in _rope_param_sets(ctx.cfg)]
    for name, v in fields:
        if v is not None and (p := _rounded_decimal(v)) is not None:
            out.append(_finding("max-position-rounded", f"{name} is {v}; the nearby power of two is {p}", field=name, value=v, power_of_two=p))
    return out


# The field each family's transformers modeling code builds its MLP activation from (GemmaMLP: config.hidden_act;
# Gemma2MLP / Gemma3MLP: config.hidden_activation; read in transformers 5.23's modeling files).
_TRANSFORMERS_READS = {"gemma": "hidden_act", "gemma2": "hidden_activation", "gemma3": "hidden_activation"}


def check_activation(ctx: _Context) -> list[Finding]:
    out = []
    fields = {k: ctx.cfg[k] for k in ("hidden_act", "hidden_activation") if ctx.cfg.get(k)}
    canon = {k: _ACTIVATIONS.get(v, v) for k, v in fields.items()}
    if len(set(canon.values())) > 1:
        out.append(_finding("activation-fields-disagree", f"hidden_act={fields['hidden_act']!r} but hidden_activation={fields['hidden_activation']!r}",
                            **fields))
    read = _TRANSFORMERS_READS.get(ctx.spec.family)
    if read is None or not fields or ctx.transformers_config is None:
        return out  # a family whose activation transformers takes as written, or a config it refuses (reported elsewhere)
    import transformers

    runs = getattr(ctx.transformers_config, read, None)
    written = fields.get(read) or next(iter(fields.values()))
    field = read if read in fields else next(iter(fields))
    if runs is not None and _ACTIVATIONS.get(runs, runs) != _ACTIVATIONS.get(written, written):
        how = "rewrites it to" if field == read else f"ignores it and reads {read}, which gives"
        out.append(_finding("activation-silently-overridden",
                            f"{field}={written!r}: transformers {transformers.__version__}'s {type(ctx.transformers_config).__name__} "
                            f"{how} {runs!r}; a library reading {field} literally runs another activation",
                            field=field, written=written, transformers_runs=runs, transformers_reads=read))
    return out


def check_rope(ctx: _Context) -> list[Finding]:
    out = []
    maxpos = ctx.cfg.get("max_position_embeddings")
    top_orig = ctx.cfg.get("original_max_position_embeddings")
    for label, p in _rope_param_sets(ctx.cfg):
        rtype = p.get("rope_type", p.get("type")) or "default"
        if rtype == "su":
            rtype = "longrope"  # legacy Phi-3 name
        if rtype not in KNOWN_ROPE_TYPES:
            out.append(_finding("rope-unknown-type", f"{label}: rope_type {rtype!r} is not a known RoPE type", where=label, rope_type=rtype))
            continue
        have = dict(p)
        if top_orig is not None:
            have.setdefault("original_max_position_embeddings", top_orig)
        missing = [k for k in ROPE_REQUIRED.get(rtype, ()) if have.get(k) is None]
        if missing:
            out.append(_finding("rope-missing-field", f"{label}: rope_type {rtype!r} needs {', '.join(missing)}, which is missing",
                                where=label, rope_type=rtype, missing=missing))
        if rtype == "longrope":
            partial = float(p.get("partial_rotary_factor", ctx.cfg.get("partial_rotary_factor", 1.0)) or 1.0)
            want = int(ctx.spec.head_dim * partial) // 2
            for k in ("short_factor", "long_factor"):
                v = p.get(k)
                if isinstance(v, list) and len(v) != want:
                    out.append(_finding("rope-longrope-factor-length",
                                        f"{label}.{k} has {len(v)} entries; rotary_dim/2 = {want}",
                                        where=f"{label}.{k}", length=len(v), expected=want))
        orig = have.get("original_max_position_embeddings")
        if rtype in ROPE_EXTENDS_CONTEXT and orig is not None and maxpos is not None and orig >= maxpos:
            out.append(_finding("rope-original-max-not-below-max",
                                f"{label}: rope_type {rtype!r} with original_max_position_embeddings {orig} >= max_position_embeddings {maxpos}",
                                where=label, original_max_position_embeddings=orig, max_position_embeddings=maxpos))
    return out