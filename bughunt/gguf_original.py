"""A GGUF file against the checkpoint it was made from (`--original DIR|HUB_ID`): every tensor of the GGUF's view is
related to the original's tensor of the same name. A faithful tensor is the original quantized to the type the GGUF
holds it in: exactly llama.cpp's quantization where gguf-py has the same quantizer (f32, f16, bf16, q8_0, q4_0, q4_1,
q5_0, q5_1), else within the type's error bound. Anything else is named: transposed, rows permuted within each head
(the RoPE interleave a converter must undo), rounded to fp16 before quantizing, another tensor of the original, or
missing from the GGUF. One tensor is held at a time (never a float64 copy of the model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bughunt.weightcheck import WeightCheck, WeightRelation, rope_interleave

# Relative L2 error a correct quantization to each type stays within, for the types gguf-py cannot quantize itself
# (measured on Gaussian rows: about a third of each bound; a permuted or swapped tensor is at ~1.4).
ERROR_BOUND = {"Q8_0": 0.012, "Q8_1": 0.012, "Q6_K": 0.035, "Q5_0": 0.07, "Q5_1": 0.07, "Q5_K": 0.07, "Q4_0": 0.14,
               "Q4_1": 0.14, "Q4_K": 0.14, "IQ4_NL": 0.14, "IQ4_XS": 0.14, "Q3_K": 0.28, "IQ3_S": 0.28,
               "IQ3_XXS": 0.3, "Q2_K": 0.55, "IQ2_XXS": 0.55, "IQ2_XS": 0.55, "IQ2_S": 0.55, "IQ1_S": 0.8, "IQ1_M": 0.8}


def relate_arguments(checkpoint: str | Path, original: str | Path) -> WeightCheck:
    """`relate` for command-line arguments: the GGUF (file or view) and the original (directory or hub id)."""
    from bughunt import sources
    from bughunt.errors import BughuntError

    view = sources.resolve(checkpoint)
    if sources.describe(view)["kind"] != "gguf":
        raise BughuntError(f"--original relates a GGUF file to the checkpoint it was made from, but {checkpoint} is not a "
                           "GGUF file. Pass the .gguf file as the checkpoint, or drop --original.")
    return relate(view, sources.resolve(original))


def relate(view: Path, original: Path) -> WeightCheck:
    """Every tensor of the original checkpoint related to the GGUF view's (sources.describe(view) must be a GGUF)."""
    from bughunt import sources
    from bughunt.checkpoint import load_weights
    from bughunt.spec import load_spec

    record = sources.describe(view)
    types: dict[str, str] = record.get("types") or {}
    spec = load_spec(original)
    orig = load_weights(original, spec)
    mine = load_weights(view, load_spec(view))
    rows = []
    for name in orig:
        if name == "lm_head.weight" and spec.tie_word_embeddings:
            continue
        if name not in types:
            rows.append(WeightRelation(name, "missing", list(orig[name].shape), list(orig[name].shape),
                                       detail="the GGUF carries no tensor for it"))
            continue
        rows.append(_relate_one(name, orig, mine[name], types[name], spec.head_dim))
        orig.release(orig[name])
    extra = sorted(n for n in types if n not in orig)
    label = f"GGUF {Path(record.get('file', view)).name} vs original {original}"
    return WeightCheck(label, record.get("file_type", "?"), rows, extra)


def _relate_one(name: str, orig: dict, stored: np.ndarray, qtype: str, head_dim: int) -> WeightRelation:
    o = np.asarray(orig[name], dtype=np.float32)
    v = np.asarray(stored, dtype=np.float32)
    row = WeightRelation(name, "", list(v.shape), list(o.shape))
    readings = [("quantized", lambda a: a, "")]
    if o.ndim == 2:
        readings.append(("transposed", lambda a: a.T, "stored = original.T, then quantized"))
    if ("q_proj" in name or "k_proj" in name) and o.shape[0] % head_dim == 0:
        readings.append(("permuted", lambda a: rope_interleave(a, head_dim), "rows half-split -> interleaved in each head"))
        readings.append(("permuted", lambda a: rope_interleave(a, head_dim, inverse=True), "rows interleaved -> half-split"))
    best = None
    for relation, transform, detail in readings:
        t = transform(o)
        if t.shape != v.shape:
            continue
        verdict = _quantized_as(t, v, qtype)
        if verdict is not None:
            row.relation = relation if relation != "quantized" or verdict[0] == "" else verdict[0]
            if row.relation == "quantized" and qtype == "F32":
                row.relation = "identical"
            row.detail = "; ".join(x for x in (detail, verdict[1]) if x)
            row.max_rel = verdict[2]
            return row
        rel = _rel(v, t)
        best = rel if best is None else min(best, rel)
    other = _another_tensor(name, orig, v, qtype)
    if other is not None:
        row.relation, row.detail = "another_tensor", f"the original's {other}"
        return row
    row.relation, row.max_rel = "different", best
    row.detail = f"relative L2 {best:.3g} from the original, past the {qtype} bound {ERROR_BOUND.get(qtype, 0):g}" if best is not None else ""
    return row


def _quantized_as(t: np.ndarray, v: np.ndarray, qtype: str) -> tuple[str, str, float] | None:
    """(relation suffix, detail, relative error) when v is t quantized to qtype (exactly, or after rounding to fp16, or
    within the type's bound), else None."""
    import gguf

    rel = _rel(v, t)
    kind = gguf.GGMLQuantizationType[qtype]
    for pre, relation in ((t, ""), (t.astype(np.float16).astype(np.float32), "quantized_fp16")):
        try:
            expected = gguf.quants.dequantize(gguf.quants.quantize(pre, kind), kind).reshape(v.shape)
        except (NotImplementedError, ValueError):
            break
        if np.array_equal(expected, v):
            how = f"exactly the {qtype} quantization" + (" of the original rounded to fp16" if relation else "")
            return relation, how, rel
    if qtype in ("F32", "F16", "BF16"):
        return None
    bound = ERROR_BOUND.get(qtype)
    if bound is not None and rel <= bound:
        return "", f"within the {qtype} bound: relative L2 {rel:.3g} <= {bound:g}", rel
    return None


def _another_tensor(name: str, orig: dict, v: np.ndarray, qtype: str) -> str | None:
    """The name of another original tensor of the same shape that v is a faithful quantization of, if any."""
    bound = ERROR_BOUND.get(qtype, 1e-6)
    for other, array in orig.items():
        if other == name or tuple(array.shape) != v.shape:
            continue
        if _rel(v, np.asarray(array, dtype=np.float32)) <= bound:
            return other
    return None


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    norm = float(np.linalg.norm(b64))
    return float(np.linalg.norm(a64 - b64)) / norm if norm > 0 else float(np.linalg.norm(a64))
