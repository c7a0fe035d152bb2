"""The weight check: compare every parameter an implementation loaded with the checkpoint's tensor of the same name,
after undoing the implementation's documented layout transform (`Runner.loaded_weights`), and name the relation:
identical, exactly the checkpoint rounded to fp16 or bf16, transposed, permuted (the RoPE interleave of rows within
each head), offset by 1 (a (1 + w) norm scale folded into the stored weight), or different (with the largest
absolute and relative difference). Conversion bugs show here before any forward pass."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np


WEIGHTS_SCHEMA = "bughunt.weights"
WEIGHTS_VERSION = 1

# What each relation means, in the words the report and the terminal print.
RELATIONS = {
    "identical": "identical to the checkpoint (at the implementation's dtype)",
    "rounded_fp16": "exactly the checkpoint rounded to fp16",
    "rounded_bf16": "exactly the checkpoint rounded to bf16",
    "transposed": "the checkpoint transposed",
    "permuted": "the checkpoint with rows permuted within each head (RoPE interleave)",
    "offset_by_one": "the checkpoint offset by 1 (a (1 + w) scale stored as w, or w stored as 1 + w)",
    "different": "different from the checkpoint",
    "not_in_checkpoint": "loaded by the implementation, absent from the checkpoint (initialised from nothing)",
    # a GGUF file against the checkpoint it was made from (bughunt/gguf_original.py)
    "quantized": "the original quantized to the GGUF's type for it (within that type's bound)",
    "quantized_fp16": "the original rounded to fp16 before it was quantized",
    "another_tensor": "another tensor of the original",
    "missing": "in the original, absent from the GGUF",
}
FAITHFUL = ("identical", "quantized")  # relations that are not a departure

# Tensors whose rows are heads x head_dim and go through RoPE: HF's layout pairs (i, i + d/2) in each head; a
# conversion from or to the interleaved (2i, 2i + 1) layout permutes rows within each head.
_ROTATED = re.compile(r"self_attn\.(q_proj|k_proj)\.(weight|bias)$|self_attn\.(q_norm|k_norm)\.weight$")


def _round(x: np.ndarray, dtype: str) -> np.ndarray:
    """x (float64) rounded to a storage dtype and back: what a model loaded at that dtype holds."""
    import ml_dtypes

    target = {"fp64": None, "fp32": np.float32, "bf16": ml_dtypes.bfloat16, "fp16": np.float16}[dtype]
    if target is None:
        return x
    with np.errstate(over="ignore"):
        return x.astype(target).astype(np.float64)


def rope_interleave(x: np.ndarray, head_dim: int, inverse: bool = False) -> np.ndarray:
    """Rows of x ([heads * head_dim, ...]) reordered within each head from the half-split RoPE layout (i pairs with
    i + d/2, HF) to the interleaved one (2i pairs with 2i + 1, Meta's original), or back with `inverse`. This is the
    permutation HF's convert_llama_weights_to_hf.py applies to q and k."""
    rows = x.shape[0]
    heads = rows // head_dim
    half = head_dim // 2
    # interleaved[2i] = half_split[i], interleaved[2i + 1] = half_split[i + d/2]
    order = np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)
    index = (np.arange(heads)[:, None] * head_dim + (np.argsort(order) if inverse else order)[None, :]).reshape(-1)
    return x[index]


@dataclass
class WeightRelation:
    """How one loaded parameter relates to the checkpoint's tensor of the same name."""

    name: str
    relation: str  # a key of RELATIONS, or two joined by "+" (e.g. "transposed+rounded_fp16")
    shape: list[int]
    checkpoint_shape: list[int] | None
    max_abs: float | None = None  # largest |loaded - checkpoint| (for "different": against the closest reading)
    max_rel: float | None = None  # max_abs / max |checkpoint|
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.relation in FAITHFUL

    def words(self) -> str:
        return " and ".join(RELATIONS[r].replace("the checkpoint ", "") if i else RELATIONS[r]
                            for i, r in enumerate(self.relation.split("+")))

    def to_dict(self) -> dict:
        return asdict(self)


def _structures(ckpt: np.ndarray, name: str, head_dim: int | None) -> list[tuple[str, Callable[[np.ndarray], np.ndarray], str]]:
    """The layout readings to try: (relation, transform of the checkpoint tensor, detail)."""
    out: list[tuple[str, Callable, str]] = [("", lambda a: a, "")]
    if ckpt.ndim == 2:
        out.append(("transposed", lambda a: a.T, "loaded = checkpoint.T"))
    if head_dim and _ROTATED.search(name) and ckpt.shape[0] % head_dim == 0 and head_dim % 2 == 0:
        hd = ckpt.shape[0] if name.endswith("norm.weight") else head_dim
        out.append(("permuted", lambda a: rope_interleave(a, hd), "rows half-split -> interleaved within each head"))
        out.append(("permuted", lambda a: rope_interleave(a, hd, inverse=True), "rows interleaved -> half-split within each head"))
    out.append(("offset_by_one", lambda a: a + 1.0, "loaded = checkpoint + 1"))
    out.append(("offset_by_one", lambda a: a - 1.0, "loaded = checkpoint - 1"))
    return out


def classify(name: str, checkpoint: np.ndarray, loaded: np.ndarray, dtype: str = "fp32",
             head_dim: int | None = None) -> WeightRelation:
    """Name the relation of `loaded` (the implementation's parameter in checkpoint orientation) to `checkpoint`.
    `dtype` is the dtype the implementation was asked to load at: the checkpoint rounded to it counts as identical.
    `head_dim` enables the RoPE-permutation reading for q/k projections. The first exact reading wins, trying the
    plain layout before transposed, permuted and offset, and the model dtype before fp16 and bf16; when none is
    exact, the relation is "different" with the figures against the closest reading."""
    if _identical_blockwise(checkpoint, loaded, dtype):  # the common case, in bounded memory
        return WeightRelation(name, "identical", list(np.shape(loaded)), list(np.shape(checkpoint)))
    c = np.asarray(checkpoint, dtype=np.float64)
    x = np.asarray(loaded, dtype=np.float64)
    row = WeightRelation(name, "", list(x.shape), list(c.shape))
    roundings = [("", dtype)] + [(f"rounded_{d}", d) for d in ("fp16", "bf16") if d != dtype]
    scale = float(np.max(np.abs(c))) if c.size else 0.0
    closest: tuple[float, str, float, str] | None = None  # (rel L2, relation, max abs, detail)
    for structure, transform, detail in _structures(c, name, head_dim):
        t = transform(c)
        if t.shape != x.shape:
            continue
        model = _round(t, dtype)
        for rounding, d in roundings:
            expected = model if not rounding else _round(_round(t, d), dtype)
            if rounding and np.array_equal(expected, model, equal_nan=True):
                continue  # rounding to d changes nothing here (the checkpoint is stored at d): not a separate reading
            if np.array_equal(x, expected, equal_nan=True):
                row.relation = "+".join(r for r in (structure, rounding) if r) or "identical"
                row.detail = detail
                diff = np.abs(x - _round(c, dtype)) if x.shape == c.shape else None
                if diff is not None and diff.size and row.relation != "identical":
                    row.max_abs = float(np.nanmax(diff))
                    row.max_rel = row.max_abs / scale if scale > 0 else None
                return row
        diff = x - model
        with np.errstate(invalid="ignore", over="ignore"):
            norm = float(np.linalg.norm(model.ravel()))
            rel = float(np.linalg.norm(diff.ravel())) / norm if norm > 0 else float(np.linalg.norm(diff.ravel()))
        if closest is None or rel < closest[0]:
            closest = (rel, structure, float(np.nanmax(np.abs(diff))) if diff.size else 0.0, detail)
    row.relation = "different"
    if closest is None:
        row.detail = f"shape {list(x.shape)} fits no reading of the checkpoint's {list(c.shape)}"
        return row
    rel, structure, max_abs, detail = closest
    row.max_abs = max_abs
    row.max_rel = max_abs / scale if scale > 0 else None
    row.detail = f"relative L2 {rel:.2e}" + (f" against the closest reading ({structure}: {detail})" if structure else "")
    return row


_BLOCK_BYTES = 64 << 20


def _identical_blockwise(checkpoint: np.ndarray, loaded: np.ndarray, dtype: str) -> bool:
    """Whether `loaded` equals the checkpoint rounded to `dtype`, read a block of rows at a time, so a correct
    implementation's largest tensor (an embedding of a 128k vocabulary) is checked without a float64 copy of it."""
    if np.shape(checkpoint) != np.shape(loaded):
        return False
    if np.ndim(checkpoint) == 0 or np.size(checkpoint) == 0:
        return np.array_equal(_round(np.asarray(checkpoint, np.float64), dtype), np.asarray(loaded, np.float64), equal_nan=True)
    row_bytes = max(1, int(np.prod(np.shape(checkpoint)[1:], dtype=np.int64)) * 8)
    step = max(1, _BLOCK_BYTES // row_bytes)
    for r0 in range(0, np.shape(checkpoint)[0], step):
        c = _round(np.asarray(checkpoint[r0:r0 + step], dtype=np.float64), dtype)
        if not np.array_equal(c, np.asarray(loaded[r0:r0 + step], dtype=np.float64), equal_nan=True):
            return False
    return True


@dataclass
class WeightCheck:
    """Every parameter an implementation exposes, checked against the checkpoint."""

    implementation: str
    dtype: str
    rows: list[WeightRelation]
    not_exposed: list[str]  # checkpoint tensors the implementation does not expose (not checked)

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.relation] = out.get(r.relation, 0) + 1
        return out

    @property
    def departures(self) -> list[WeightRelation]:
        return [r for r in self.rows if not r.ok]

    def summary(self) -> str:
        """One sentence: what the check found."""
        bad = self.departures
        if not bad:
            return f"{self.implementation}: all {len(self.rows)} loaded parameters are identical to the checkpoint at {self.dtype}."
        kinds = {}
        for r in bad:
            kinds.setdefault(r.relation, []).append(r.name)
        parts = [f"{len(names)} {RELATIONS[k] if k in RELATIONS else ' and '.join(RELATIONS[p] for p in k.split('+'))} "
                 f"(e.g. {names[0]})" for k, names in kinds.items()]
        return f"{self.implementation}: {len(bad)} of {len(self.rows)} loaded parameters depart: " + "; ".join(parts) + "."

    def to_dict(self, all_rows: bool = False) -> dict:
        """The record compare's result and `bughunt weights --json` keep: counts, and the rows that depart (every
        row with `all_rows`)."""
        return {"implementation": self.implementation, "dtype": self.dtype, "checked": len(self.rows), "counts": self.counts,
                "summary": self.summary(), "not_exposed": self.not_exposed,
                "rows": [r.to_dict() for r in (self.rows if all_rows else self.departures)]}


def check_loaded(implementation: str, dtype: str, loaded: Iterable[tuple[str, np.ndarray]], stored: dict[str, np.ndarray],
                 head_dim: int | None = None, release: Callable[[np.ndarray], None] | None = None) -> WeightCheck:
    """Classify each (name, array) an implementation yields against `stored` (name -> checkpoint tensor, e.g. the
    memory-mapped weights from `checkpoint.load_weights`). One tensor is held at a time."""
    rows, seen = [], set()
    for name, array in loaded:
        seen.add(name)
        if name not in stored:
            rows.append(WeightRelation(name, "not_in_checkpoint", list(np.shape(array)), None,
                                       detail="the checkpoint has no tensor of this name"))
            continue
        rows.append(classify(name, stored[name], array, dtype, head_dim))
        if release is not None:
            release(stored[name])
    return WeightCheck(implementation, dtype, rows, sorted(n for n in stored if n not in seen))


def check_runner(runner) -> WeightCheck:
    """The weight check of an open runner: its `loaded_weights()` against the checkpoint it loaded."""
    from bughunt.checkpoint import load_weights

    stored = load_weights(runner.checkpoint, runner.spec, runner.allow_pickle)
    wc = check_loaded(runner.label, runner.dtype, runner.loaded_weights(), stored, runner.spec.head_dim,
                      getattr(stored, "release", None))
    if runner.spec.tie_word_embeddings:  # lm_head is the embedding: checked under that name
        wc.not_exposed = [n for n in wc.not_exposed if n != "lm_head.weight"]
    return wc


def check_for_trace(runner) -> dict:
    """The record compare keeps in a trace's metadata: the check's counts and departing rows, or why it could not run
    (a weight check that fails must not fail the forward pass it rides along with)."""
    try:
        return check_runner(runner).to_dict()
    except Exception as e:  # noqa: BLE001 - reported in the record, the trace stands
        return {"implementation": runner.label, "dtype": runner.dtype, "error": f"{type(e).__name__}: {e}"}


def from_dict(d: dict) -> WeightCheck:
    return WeightCheck(d["implementation"], d["dtype"], [WeightRelation(**r) for r in d["rows"]], d["not_exposed"])


def format_check(wc: WeightCheck) -> str:
    """The terminal table: a count per relation, then every departing parameter."""
    lines = [wc.summary(), "  " + ", ".join(f"{k}: {v}" for k, v in sorted(wc.counts.items()))]
    if wc.not_exposed:
        lines.append(f"  not exposed by the implementation (not checked): {', '.join(wc.not_exposed[:6])}"
                     + (f" and {len(wc.not_exposed) - 6} more" if len(wc.not_exposed) > 6 else ""))
    bad = wc.departures
    if bad:
        lines.append(f"  {'parameter':<48} {'relation':<26} {'max abs':>9} {'max rel':>9}  detail")
        fmt = lambda v: "–" if v is None else f"{v:.2e}"  # noqa: E731
        for r in bad:
            lines.append(f"  {r.name:<48} {r.relation:<26} {fmt(r.max_abs):>9} {fmt(r.max_rel):>9}  {r.detail}")
    return "\n".join(lines)


def write_json(wc: WeightCheck, path: Path, protect=()) -> None:
    """`bughunt weights --json`: every parameter's relation, written atomically; an existing file is replaced only
    when it is an earlier weights document (bughunt/output.py's policy)."""
    import json

    from bughunt.output import write_output_file

    doc = {"schema": WEIGHTS_SCHEMA, "version": WEIGHTS_VERSION, **wc.to_dict(all_rows=True)}
    write_output_file(path, json.dumps(doc, indent=1) + "\n", WEIGHTS_SCHEMA, protect)
