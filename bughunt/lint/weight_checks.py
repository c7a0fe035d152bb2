"""Lint checks of the stored weights against config.json: dtype, shapes, non-finite values, untrained embedding rows,
tied embeddings."""

from __future__ import annotations

import numpy as np

from bughunt.lint.catalog import _CONFIG_DTYPES, UNTRAINED_ROW_RATIO, _Context, Finding, _finding, _Skip

_EMBED, _HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _require_embed(ctx: _Context) -> None:
    if _EMBED not in ctx.stored:
        raise _Skip(f"no {_EMBED} in the weights (weight checks know the Hugging Face decoder names only)")


def check_dtype(ctx: _Context) -> list[Finding]:
    want = ctx.spec.config_dtype
    if want is None:
        raise _Skip("config.json names no dtype")
    want_code = _CONFIG_DTYPES.get(str(want))
    if want_code is None:
        raise _Skip(f"config dtype {want!r} is not a floating dtype bughunt knows")
    counts: dict[str, int] = {}
    for _shape, dt in ctx.stored.values():
        if dt in _CONFIG_DTYPES.values():
            counts[dt] = counts.get(dt, 0) + 1
    if not counts:
        raise _Skip("no floating-point tensors stored")
    stored = max(counts, key=counts.get)
    if stored != want_code:
        names = {v: k for k, v in _CONFIG_DTYPES.items()}
        return [_finding("dtype-mismatch", f"config.json says {want} but the weights are stored as {names[stored]} "
                                           f"({counts[stored]} of {sum(counts.values())} tensors)",
                         config_dtype=want, stored=counts)]
    return []


def _row_norms(w: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """L2 norm of every row, upcast a chunk at a time so a 256k-row bf16 embedding never exists in float64."""
    out = np.empty(w.shape[0], dtype=np.float64)
    for i in range(0, w.shape[0], chunk):
        part = w[i:i + chunk].astype(np.float64)
        out[i:i + chunk] = np.sqrt(np.einsum("ij,ij->i", part, part))
    return out


def _max_abs_difference(a: np.ndarray, b: np.ndarray, chunk: int = 8192) -> float:
    return max(float(np.max(np.abs(a[i:i + chunk].astype(np.float32) - b[i:i + chunk].astype(np.float32))))
               for i in range(0, a.shape[0], chunk))


def _token_strings(ctx: _Context, ids: list[int]) -> dict[int, str] | None:
    path = ctx.checkpoint / "tokenizer.json"
    if not path.exists():
        return None
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
    except Exception:
        return None
    return {i: tok.id_to_token(i) for i in ids}


def check_untrained_rows(ctx: _Context) -> list[Finding]:
    _require_embed(ctx)
    out = []
    names = [_EMBED] + ([_HEAD] if _HEAD in ctx.stored else [])
    for name in names:
        norms = _row_norms(ctx.tensor(name))
        median = float(np.median(norms))
        threshold = UNTRAINED_ROW_RATIO * median
        ids = [int(i) for i in np.nonzero(norms <= threshold)[0] if int(i) != ctx.spec.pad_token_id]
        if ids:
            shown = ids[:100]
            out.append(_finding("untrained-embedding-rows",
                                f"{name}: {len(ids)} of {len(norms)} rows have norm <= {UNTRAINED_ROW_RATIO:g} x the median "
                                f"row norm {median:.3g}; token ids {', '.join(map(str, ids[:20]))}{' ...' if len(ids) > 20 else ''}",
                                tensor=name, count=len(ids), token_ids=shown, median_norm=median, threshold=threshold,
                                zero_rows=int(np.sum(norms[ids] == 0)), tokens=_token_strings(ctx, shown[:20])))
    return out


def check_tied_embeddings(ctx: _Context) -> list[Finding]:
    _require_embed(ctx)
    tie = ctx.spec.tie_word_embeddings
    where = "tie_word_embeddings" + ("" if "tie_word_embeddings" in ctx.cfg else f" (not in config.json; the {ctx.spec.family} default)")
    if _HEAD not in ctx.stored:
        if not tie:
            return [_finding("untied-but-lm-head-missing", f"{where} is false but no {_HEAD} is stored", tie_word_embeddings=False)]
        return []
    embed, head = ctx.tensor(_EMBED), ctx.tensor(_HEAD)
    same = embed.shape == head.shape and bool(np.array_equal(embed, head))
    diff = None if same or embed.shape != head.shape else _max_abs_difference(embed, head)
    if tie and not same:
        return [_finding("tied-but-lm-head-differs", f"{where} is true but the stored {_HEAD} differs from {_EMBED}"
                         + (f" (max abs difference {diff:.3g})" if diff is not None else f" (shapes {head.shape} vs {embed.shape})"),
                         tie_word_embeddings=True, max_abs_difference=diff)]
    if tie and same:
        return [_finding("tied-but-lm-head-stored", f"{where} is true and an identical {_HEAD} is stored", tie_word_embeddings=True)]
    if not tie and same:
        return [_finding("untied-but-lm-head-equals-embed", f"{where} is false but {_HEAD} is identical to {_EMBED}", tie_word_embeddings=False)]
    return []


def check_weights_against_config(ctx: _Context) -> list[Finding]:
    """Both ways: the tensors config.json implies that are missing or shaped otherwise, and the stored ones it does
    not imply; first, whether config.json implies more values than the files hold at all."""
    from bughunt.checkpoint import expected_shapes, weight_files
    from bughunt.inputs.weights import inventory, size_mismatch

    expected = expected_shapes(ctx.spec)
    out = []
    size = size_mismatch(expected, ctx.stored, weight_files(ctx.checkpoint))
    if size:
        out.append(_finding("config-exceeds-weights", size))
    inv = inventory(expected, ctx.stored, ctx.spec.num_layers)
    if inv.missing:
        names = list(inv.missing)
        out.append(_finding("weights-missing", f"{len(names)} tensor(s) missing: " + ", ".join(f"{n} {inv.missing[n]}" for n in names[:5])
                            + (" ..." if len(names) > 5 else ""), missing={n: list(v) for n, v in list(inv.missing.items())[:100]}))
    if inv.mismatched:
        names = list(inv.mismatched)
        out.append(_finding("weights-shape-mismatch", f"{len(names)} tensor(s) shaped otherwise than config.json implies: "
                            + "; ".join(f"{n} is {h}, config implies {w}" for n, (h, w) in list(inv.mismatched.items())[:5])
                            + (" ..." if len(names) > 5 else ""),
                            mismatched={n: {"stored": list(h), "expected": list(w)} for n, (h, w) in list(inv.mismatched.items())[:100]}))
    if inv.unexpected:
        out.append(_finding("weights-unexpected", inv.describe_unexpected(ctx.spec.num_layers), tensors=inv.unexpected[:100],
                            extra_layers=sorted(inv.extra_layers)))
    return out


def check_nonfinite_weights(ctx: _Context) -> list[Finding]:
    """NaN/Inf in every floating tensor, memory-mapped and scanned a block of rows at a time."""
    from bughunt.checkpoint import weight_files
    from bughunt.inputs.weights import scan_nonfinite
    from bughunt.safetensors_io import map_safetensors

    out = []
    for f in weight_files(ctx.checkpoint):
        for bad in scan_nonfinite(map_safetensors(f)):
            row = f"row {bad.first_row}" + (f" (token id {bad.first_row})" if bad.tensor in (_EMBED, _HEAD) else "")
            out.append(_finding("weights-nonfinite", f"{bad.tensor}: {bad.nan} NaN and {bad.inf} Inf values, first in {row}",
                                tensor=bad.tensor, file=f.name, nan=bad.nan, inf=bad.inf, first_row=bad.first_row))
    return out