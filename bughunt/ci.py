"""The `ci` experiment: run a matrix of cells (checkpoint x implementation x dtype x device, each against the
checkpoint's reference) from a TOML file, judge every cell against its stored baseline and the thresholds,
and write JUnit XML, a Markdown summary and the HTML reports. Exit codes: 0 pass, 1 regression, 2 bad input.

A matrix file (see examples/bughunt.toml for every key):

    reference = "reference"            # what each cell is compared against (float64 reference by default)
    implementations = ["hf"]           # NAME[@PYTHON]; the dtype of a cell comes from `dtypes`
    dtypes = ["fp32", "bf16"]
    devices = ["cpu"]
    tokens = { length = 16, seed = 0 } # or tokens = { ids = [[2, 17, 99]] }
    generate = { steps = 8, top_k = 5 } # optional: greedy generation per cell (metrics gen_matched_steps, gen_topk_ok)

    [[checkpoints]]
    tiny = "llama"                     # a generated tiny checkpoint, or path = "models/x" (relative to this file)

    [[thresholds]]
    metric = "rel_l2"                  # rel_l2 | log10_l2 | cosine | max_abs | kl | top1 | delta_nll | ppl_ratio
    points = "*"                       # glob over capture points; kl, top1, delta_nll, ppl_ratio exist only at "logits"
    baseline_factor = 10               # regression: worse than 10 x the baseline value + slack
    slack = 1e-6

Baselines are one pretty-printed JSON file per cell holding the metrics at every capture point, rounded to four
significant digits, so they are stable on one machine and a change reads well in a diff.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import hashlib
import html
import json
import math
import os
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bughunt.errors import BughuntError
from bughunt.implementations import DEVICES, DTYPES, ImplChoice, available, require_device
from bughunt.implementations.catalog import family_refusal
from bughunt.inputs.config import MAX_TOKEN_ID
from bughunt.inputs.documents import check_baseline_points, read_baseline_json, read_toml
from bughunt.output import check_output_dir, check_output_file, write_output_dir, write_output_file
from bughunt.tiny import TINY_FAMILIES

BASELINE_SCHEMA = "bughunt.baseline"
BASELINE_SCHEMA_VERSION = 1

ERROR_METRICS = ("rel_l2", "log10_l2", "max_abs", "kl")  # larger is worse
SIMILARITY_METRICS = ("cosine", "top1")  # 1 is perfect; judged by their distance from 1
# The loss on the input: delta_nll (candidate minus reference mean NLL, nats/token) is judged by its absolute value;
# ppl_ratio = exp(delta_nll) by its distance from 1 under baseline rules, as is under max/min.
LOSS_METRICS = ("delta_nll", "ppl_ratio")
# Greedy generation (with a matrix's `generate`): gen_matched_steps, the tokens equal to the reference's before the first
# difference (judged by min); gen_topk_ok, the fraction of rows passing the top-k check where they first differ (1 is perfect).
GENERATION_METRICS = ("gen_matched_steps", "gen_topk_ok")
METRICS = ERROR_METRICS + SIMILARITY_METRICS + LOSS_METRICS + GENERATION_METRICS
LOGITS_ONLY = ("kl", "top1") + LOSS_METRICS + GENERATION_METRICS
FLOOR_OF = {"rel_l2": "floor_rel_l2", "delta_nll": "floor_delta_nll"}  # metrics a floor_factor rule can judge
SUMMARIES = ("max", "min", "mean")
DEFAULT_TOKENS = {"length": 16, "seed": 0}
MAX_TOKENS = 1_000_000  # input length a cell may ask for (far beyond any context a CI cell runs)

# Used when a matrix has no [[thresholds]]: a regression is a metric 10x worse than its baseline, with an
# absolute slack so the last bits of fp32 noise never flake.
DEFAULT_THRESHOLDS = (
    {"metric": "rel_l2", "baseline_factor": 10.0, "slack": 1e-6},
    {"metric": "kl", "baseline_factor": 10.0, "slack": 1e-6},
    {"metric": "top1", "baseline_factor": 10.0, "slack": 0.1},
)


# ------------------------------------------------------------------------------------------------
# The matrix file
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tokens:
    """Input ids: explicit rows, or `length` deterministic ids drawn from `seed` (BOS first when the config has one)."""

    ids: tuple[tuple[int, ...], ...] | None = None
    length: int = DEFAULT_TOKENS["length"]
    seed: int = DEFAULT_TOKENS["seed"]
    text: Any = None  # a bughunt.text.TextRequest: prompt, prompt_file or chat, through the checkpoint's tokenizer

    def resolve(self, spec, checkpoint: Path | None = None) -> np.ndarray:
        return self.encode(spec, checkpoint)[0]

    def encode(self, spec, checkpoint: Path | None = None):
        """(ids, the bughunt.text.EncodedText they came from, or None for ids given as ids or drawn from the seed)."""
        from bughunt.compare import default_tokens

        if self.text is not None:
            from bughunt.text import encode_text

            encoded = encode_text(checkpoint, self.text, spec)
            return encoded.tokens, encoded
        if self.ids is not None:
            return np.asarray(self.ids, dtype=np.int64), None
        return default_tokens(spec, self.length, self.seed), None


@dataclass(frozen=True)
class CheckpointEntry:
    name: str
    path: Path | None  # a checkpoint directory, or None for a generated tiny checkpoint
    tiny: str | None
    seed: int
    reference: ImplChoice
    implementations: tuple[ImplChoice, ...]
    dtypes: tuple[str, ...]
    devices: tuple[str, ...]
    tokens: Tokens
    trained: bool = False  # a tiny checkpoint trained briefly on the shipped text (bughunt tiny --trained)

    def resolve(self) -> Path:
        if self.tiny is not None:
            from bughunt.tiny import tiny_checkpoint

            return tiny_checkpoint(self.tiny, self.seed, trained=self.trained)
        assert self.path is not None
        return self.path


@dataclass(frozen=True)
class Threshold:
    """One rule every matching cell must meet, at each matching capture point (or on their `summary`)."""

    index: int
    metric: str
    points: str = "*"
    cells: str = "*"
    summary: str | None = None
    max: float | None = None
    min: float | None = None
    floor_factor: float | None = None
    baseline_factor: float | None = None
    slack: float = 0.0

    def describe(self) -> str:
        where = f"{self.summary} over {self.points}" if self.summary else f"at {self.points}"
        limits = []
        if self.max is not None:
            limits.append(f"<= {self.max:g}")
        if self.min is not None:
            limits.append(f">= {self.min:g}")
        if self.floor_factor is not None:
            limits.append(f"<= {self.floor_factor:g}x the noise floor")
        if self.metric == "delta_nll" and (self.max is not None or self.min is not None or self.floor_factor is not None):
            limits = [f"|delta_nll| {x}" for x in limits]
        if self.baseline_factor is not None:
            what = {"cosine": "1 - cosine", "top1": "1 - top1", "log10_l2": "L2"}.get(self.metric, self.metric)
            limits.append(f"{what} <= {self.baseline_factor:g}x baseline + {self.slack:g}")
        cells = "" if self.cells == "*" else f" (cells {self.cells})"
        return f"{self.metric} {where}{cells}: " + ", ".join(limits)


@dataclass(frozen=True)
class Matrix:
    source: Path
    checkpoints: tuple[CheckpointEntry, ...]
    thresholds: tuple[Threshold, ...]
    branches: bool = True
    generate: tuple[int, int] | None = None  # (steps, top_k): each cell also generates greedily


_TOP_KEYS = ("reference", "implementations", "dtypes", "devices", "tokens", "branches", "generate", "checkpoints", "thresholds")
_CHECKPOINT_KEYS = ("name", "path", "tiny", "seed", "trained", "reference", "implementations", "dtypes", "devices", "tokens")
_THRESHOLD_KEYS = ("metric", "points", "cells", "summary", "max", "min", "floor_factor", "baseline_factor", "slack")
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}.get(type(v), type(v).__name__)


def _check_keys(table: dict, known: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise BughuntError(f"{where}: unknown key '{key}'.{hint} Allowed keys: {', '.join(known)}.")


def _string(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise BughuntError(f"{where} must be a non-empty string, found {_type_name(v)} {v!r}.")
    return v


def _int(v: Any, where: str, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise BughuntError(f"{where} must be an integer, found {_type_name(v)} {v!r}.")
    if minimum is not None and v < minimum:
        raise BughuntError(f"{where} must be at least {minimum}, found {v}.")
    if maximum is not None and v > maximum:
        raise BughuntError(f"{where} must be at most {maximum}, found {v}.")
    return v


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v) if abs(v) < 1e308 else math.inf):
        raise BughuntError(f"{where} must be a finite number, found {_type_name(v)} {str(v)[:40]}.")
    return float(v)


def _string_list(v: Any, where: str, example: str) -> list[str]:
    if not isinstance(v, list) or not v:
        raise BughuntError(f"{where} must be a non-empty list of strings, e.g. {where.rsplit(': ', 1)[-1]} = {example}; found {_type_name(v)} {v!r}.")
    return [_string(x, f"{where}[{i}]") for i, x in enumerate(v)]


def _known(v: Any, where: str, allowed: tuple[str, ...], what: str, example: str) -> tuple[str, ...]:
    """A non-empty list of names from `allowed`, de-duplicated in order."""
    out = _string_list(v, where, example)
    for i, d in enumerate(out):
        if d not in allowed:
            raise BughuntError(f"{where}[{i}]: '{d}' is not a {what}. Use one of: {', '.join(allowed)}.")
    return tuple(dict.fromkeys(out))


def _dtypes(v: Any, where: str) -> tuple[str, ...]:
    return _known(v, where, DTYPES, "dtype", '["fp32", "bf16"]')


def _devices(v: Any, where: str) -> tuple[str, ...]:
    return _known(v, where, DEVICES, "device", '["cpu"]')


def _implementations(v: Any, where: str) -> tuple[ImplChoice, ...]:
    out = []
    for i, text in enumerate(_string_list(v, where, '["hf"]')):
        try:
            choice = ImplChoice.parse(text)
        except BughuntError as e:
            raise BughuntError(f"{where}[{i}]: {e}") from None
        if choice.dtype is not None:
            raise BughuntError(f"{where}[{i}]: '{text}' names a dtype; list implementations without one (e.g. '{choice.name}') "
                               f"and put the dtypes in dtypes = [...], so every implementation runs at every dtype.")
        if choice.python is None and not available(choice.name):
            from bughunt.envs import OWN_ENVIRONMENTS, require_own_python

            if choice.name in OWN_ENVIRONMENTS:
                try:
                    require_own_python(choice.name)
                except BughuntError as e:
                    raise BughuntError(f"{where}[{i}]: {e}") from None
            raise BughuntError(f"{where}[{i}]: implementation '{choice.name}' is not installed here. Install it, "
                               f"or run it in another interpreter with '{choice.name}@/path/to/python'.")
        out.append(choice)
    labels = [c.label for c in out]
    if len(set(labels)) != len(labels):
        raise BughuntError(f"{where}: an implementation is listed twice ({labels}). List each once.")
    return tuple(out)


def _reference(v: Any, where: str) -> ImplChoice:
    text = _string(v, where)
    try:
        choice = ImplChoice.parse(text)
    except BughuntError as e:
        raise BughuntError(f"{where}: {e}") from None
    if choice.dtype is None and choice.name != "reference":
        raise BughuntError(f"{where}: give the reference a dtype, e.g. '{choice.name}:fp32' "
                           "(only the float64 'reference' implementation has a default dtype).")
    return choice


def _tokens(v: Any, where: str, base_dir: Path) -> Tokens:
    from bughunt.text import TEXT_KEYS, request_from_table

    if not isinstance(v, dict):
        raise BughuntError(f"{where} must be a table, e.g. {{ length = 16, seed = 0 }}, {{ ids = [[2, 17, 99]] }} or "
                           f"{{ prompt = \"Hello\" }}; found {_type_name(v)} {v!r}.")
    _check_keys(v, ("ids", "length", "seed") + TEXT_KEYS, where)
    text = request_from_table(v, where, base_dir)
    if text is not None:
        if any(k in v for k in ("ids", "length", "seed")):
            raise BughuntError(f"{where}: give either text (prompt, prompt_file, chat) or ids, or length and seed; not both.")
        return Tokens(text=text)
    if "ids" in v:
        if "length" in v or "seed" in v:
            raise BughuntError(f"{where}: give either ids, or length and seed, not both.")
        rows = v["ids"]
        if isinstance(rows, list) and rows and all(isinstance(t, int) and not isinstance(t, bool) for t in rows):
            rows = [rows]
        if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
            raise BughuntError(f"{where}.ids must be a non-empty list of token ids, or a list of equal-length rows, e.g. ids = [[2, 17, 99]]; found {rows!r}.")
        ids = tuple(tuple(_int(t, f"{where}.ids[{i}][{j}]", minimum=0, maximum=MAX_TOKEN_ID) for j, t in enumerate(r)) for i, r in enumerate(rows))
        if len({len(r) for r in ids}) != 1:
            raise BughuntError(f"{where}.ids: every row must have the same length; found lengths {[len(r) for r in ids]}.")
        return Tokens(ids=ids)
    length = _int(v.get("length", DEFAULT_TOKENS["length"]), f"{where}.length", minimum=1, maximum=MAX_TOKENS)
    seed = _int(v.get("seed", DEFAULT_TOKENS["seed"]), f"{where}.seed", minimum=0, maximum=MAX_TOKEN_ID)
    return Tokens(length=length, seed=seed)


def _checkpoint(t: Any, where: str, defaults: dict, base_dir: Path) -> CheckpointEntry:
    if not isinstance(t, dict):
        raise BughuntError(f"{where} must be a table ([[checkpoints]] with path = ... or tiny = ...), found {_type_name(t)} {t!r}.")
    _check_keys(t, _CHECKPOINT_KEYS, where)
    if ("path" in t) == ("tiny" in t):
        raise BughuntError(f"{where}: give exactly one of path = \"dir\" (a Hugging Face-format checkpoint) "
                           f"or tiny = \"family\" (a generated tiny checkpoint; families: {', '.join(TINY_FAMILIES)}).")
    path = tiny = None
    seed = 0
    if "tiny" in t:
        tiny = _string(t["tiny"], f"{where}.tiny")
        if tiny not in TINY_FAMILIES:
            raise BughuntError(f"{where}.tiny: no tiny checkpoint for family '{tiny}'. Choose one of: {', '.join(TINY_FAMILIES)}.")
        seed = _int(t.get("seed", 0), f"{where}.seed", minimum=0, maximum=MAX_TOKEN_ID)
        trained = t.get("trained", False)
        if not isinstance(trained, bool):
            raise BughuntError(f"{where}.trained must be true or false, found {_type_name(trained)} {trained!r}.")
        default_name = (tiny if seed == 0 else f"{tiny}-seed{seed}") + ("-trained" if trained else "")
    else:
        for key in ("seed", "trained"):
            if key in t:
                raise BughuntError(f"{where}.{key} only applies to tiny checkpoints; remove it or use tiny = \"family\".")
        path = Path(os.path.expanduser(_string(t["path"], f"{where}.path")))
        path = path if path.is_absolute() else base_dir / path
        default_name = path.name
    name = _string(t.get("name", default_name), f"{where}.name")
    if not set(name) <= _NAME_CHARS:
        raise BughuntError(f"{where}.name: '{name}' may hold only letters, digits, '.', '_' and '-' (it names cells and files). Set name = \"...\".")
    return CheckpointEntry(
        name=name, path=path, tiny=tiny, seed=seed,
        reference=_reference(t["reference"], f"{where}.reference") if "reference" in t else defaults["reference"],
        implementations=_implementations(t["implementations"], f"{where}.implementations") if "implementations" in t else defaults["implementations"],
        dtypes=_dtypes(t["dtypes"], f"{where}.dtypes") if "dtypes" in t else defaults["dtypes"],
        devices=_devices(t["devices"], f"{where}.devices") if "devices" in t else defaults["devices"],
        tokens=_tokens(t["tokens"], f"{where}.tokens", base_dir) if "tokens" in t else defaults["tokens"],
        trained=bool(tiny is not None and t.get("trained", False)),
    )


def _threshold(t: Any, index: int, where: str) -> Threshold:
    if not isinstance(t, dict):
        raise BughuntError(f"{where} must be a table ([[thresholds]] with metric = ... and a limit), found {_type_name(t)} {t!r}.")
    _check_keys(t, _THRESHOLD_KEYS, where)
    if "metric" not in t:
        raise BughuntError(f"{where}: missing key 'metric'. Add metric = \"rel_l2\" (one of: {', '.join(METRICS)}).")
    metric = _string(t["metric"], f"{where}.metric")
    if metric not in METRICS:
        close = difflib.get_close_matches(metric, METRICS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise BughuntError(f"{where}.metric: unknown metric '{metric}'.{hint} Use one of: {', '.join(METRICS)}.")
    points = _string(t.get("points", "logits" if metric in LOGITS_ONLY else "*"), f"{where}.points")
    if metric in LOGITS_ONLY and not fnmatch.fnmatchcase("logits", points):
        raise BughuntError(f"{where}: {metric} exists only at the logits capture point, but points = \"{points}\" does not match it. Set points = \"logits\".")
    cells = _string(t.get("cells", "*"), f"{where}.cells")
    summary = t.get("summary")
    if summary is not None and summary not in SUMMARIES:
        raise BughuntError(f"{where}.summary must be one of {', '.join(SUMMARIES)} (judge one number over the matched points), found {summary!r}.")
    limits = {k: _number(t[k], f"{where}.{k}") for k in ("max", "min", "floor_factor", "baseline_factor", "slack") if k in t}
    if not any(k in limits for k in ("max", "min", "floor_factor", "baseline_factor")):
        raise BughuntError(f"{where}: no limit given. Add at least one of max, min (absolute), floor_factor (x the noise floor) "
                           "or baseline_factor (x the baseline value, with slack).")
    if "floor_factor" in limits:
        if metric not in FLOOR_OF:
            raise BughuntError(f"{where}.floor_factor: noise floors exist for {' and '.join(FLOOR_OF)}; use it with metric = \"rel_l2\" "
                               "or metric = \"delta_nll\".")
        if summary is not None:
            raise BughuntError(f"{where}.floor_factor judges each capture point against its own floor; remove summary.")
        if limits["floor_factor"] <= 0:
            raise BughuntError(f"{where}.floor_factor must be positive, found {limits['floor_factor']:g}.")
    if metric == "gen_matched_steps" and "baseline_factor" in limits:
        raise BughuntError(f"{where}: gen_matched_steps is a count of steps, not an error that grows; bound it with min = N "
                           "(at least N generated tokens equal to the reference's) instead of baseline_factor.")
    if "baseline_factor" in limits and limits["baseline_factor"] < 1:
        raise BughuntError(f"{where}.baseline_factor must be at least 1 (how many times worse than the baseline is allowed), found {limits['baseline_factor']:g}.")
    if "slack" in limits:
        if "baseline_factor" not in limits:
            raise BughuntError(f"{where}.slack is the absolute slack of a baseline_factor rule; add baseline_factor or remove slack.")
        if limits["slack"] < 0:
            raise BughuntError(f"{where}.slack must be zero or positive, found {limits['slack']:g}.")
    return Threshold(index=index, metric=metric, points=points, cells=cells, summary=summary, **limits)


def parse_matrix(data: dict, source: Path) -> Matrix:
    """Validate a parsed TOML document strictly; every problem is a BughuntError naming the key and the fix."""
    where = source.name
    _check_keys(data, _TOP_KEYS, where)
    defaults = {
        "reference": _reference(data.get("reference", "reference"), f"{where}: reference"),
        "implementations": _implementations(data.get("implementations", ["hf"]), f"{where}: implementations"),
        "dtypes": _dtypes(data.get("dtypes", ["fp32"]), f"{where}: dtypes"),
        "devices": _devices(data.get("devices", ["cpu"]), f"{where}: devices"),
        "tokens": _tokens(data.get("tokens", dict(DEFAULT_TOKENS)), f"{where}: tokens", source.parent),
    }
    branches = data.get("branches", True)
    if not isinstance(branches, bool):
        raise BughuntError(f"{where}: branches must be true or false, found {_type_name(branches)} {branches!r}.")
    raw = data.get("checkpoints")
    if raw is None:
        raise BughuntError(f"{where}: no checkpoints. Add at least one [[checkpoints]] table with path = \"dir\" or tiny = \"llama\".")
    if not isinstance(raw, list) or not raw:
        raise BughuntError(f"{where}: checkpoints must be a list of tables ([[checkpoints]]), found {_type_name(raw)} {raw!r}.")
    checkpoints = tuple(_checkpoint(t, f"{where}: checkpoints[{i}]", defaults, source.parent) for i, t in enumerate(raw))
    names = [c.name for c in checkpoints]
    for name in names:
        if names.count(name) > 1:
            raise BughuntError(f"{where}: two checkpoints are named '{name}'. Give them distinct name = \"...\" keys.")
    for i, c in enumerate(checkpoints):
        for impl in c.implementations:
            for dtype in c.dtypes:
                if dataclasses.replace(impl, dtype=dtype).label == c.reference.label or (
                        impl.name == c.reference.name == "reference" and c.reference.dtype is None and dtype == "fp64"):
                    raise BughuntError(f"{where}: checkpoints[{i}] ({c.name}): {impl.name} at {dtype} is the reference itself. "
                                       "Drop that dtype or implementation, or choose another reference.")
    raw_t = data.get("thresholds")
    if raw_t is None:
        raw_t = [dict(t) for t in DEFAULT_THRESHOLDS]
    elif not isinstance(raw_t, list) or not raw_t:
        raise BughuntError(f"{where}: thresholds must be a list of tables ([[thresholds]]), found {_type_name(raw_t)} {raw_t!r}. "
                           "Leave it out to use the defaults.")
    thresholds = tuple(_threshold(t, i, f"{where}: thresholds[{i}]") for i, t in enumerate(raw_t))
    generate = _generate(data["generate"], f"{where}: generate") if "generate" in data else None
    for rule in thresholds:
        if rule.metric in GENERATION_METRICS and generate is None:
            raise BughuntError(f"{where}: thresholds[{rule.index}] judges {rule.metric}, which needs generation. Add "
                               "generate = { steps = 8, top_k = 5 } at the top of the matrix, or remove the rule.")
    return Matrix(source=source, checkpoints=checkpoints, thresholds=thresholds, branches=branches, generate=generate)


def _generate(v: Any, where: str) -> tuple[int, int]:
    from bughunt.generation import DEFAULT_TOP_K, MAX_STEPS

    if not isinstance(v, dict):
        raise BughuntError(f"{where} must be a table, e.g. generate = {{ steps = 8, top_k = 5 }}; found {_type_name(v)} {v!r}.")
    _check_keys(v, ("steps", "top_k"), where)
    if "steps" not in v:
        raise BughuntError(f"{where}: missing key 'steps' (how many tokens each implementation generates), e.g. steps = 8.")
    return (_int(v["steps"], f"{where}.steps", minimum=1, maximum=MAX_STEPS),
            _int(v.get("top_k", DEFAULT_TOP_K), f"{where}.top_k", minimum=1, maximum=MAX_TOKEN_ID))


def load_matrix(path: str | Path) -> Matrix:
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise BughuntError(f"matrix file {path} does not exist. Write one (see examples/bughunt.toml) or fix the path.")
    return parse_matrix(read_toml(path), path)


# ------------------------------------------------------------------------------------------------
# Cells and baselines
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    checkpoint: str
    impl: ImplChoice  # with the cell's dtype set
    device: str
    reference: ImplChoice

    @property
    def id(self) -> str:
        return f"{self.checkpoint}/{self.impl.label}/{self.device}"

    @property
    def dtype(self) -> str:
        assert self.impl.dtype is not None
        return self.impl.dtype

    @property
    def baseline_name(self) -> str:
        return "__".join(_safe(s) for s in (self.checkpoint, self.impl.label, self.device)) + ".json"


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "-" if ch == ":" else "_" for ch in text).strip("_")


def cells_of(entry: CheckpointEntry) -> list[Cell]:
    return [Cell(entry.name, dataclasses.replace(impl, dtype=dtype), device, entry.reference)
            for impl in entry.implementations for dtype in entry.dtypes for device in entry.devices]


def _round(value: float | None, metric: str) -> float | None:
    """Four significant digits; for cosine and top1, four significant digits of the distance from 1."""
    if value is None:
        return None
    if metric in SIMILARITY_METRICS or metric == "gen_topk_ok":
        return float(Decimal(1) - Decimal(f"{1.0 - value:.3e}"))
    if metric == "gen_matched_steps":
        return float(value)
    if metric == "ppl_ratio":
        return float(Decimal(1) + Decimal(f"{value - 1.0:.3e}"))
    return float(f"{value:.3e}")


def _tokens_identity(tokens: np.ndarray) -> dict:
    return {"shape": list(tokens.shape), "sha256": hashlib.sha256(np.ascontiguousarray(tokens, dtype="<i8").tobytes()).hexdigest()}


def baseline_document(cell: Cell, comparison: dict, tokens: np.ndarray, branches: bool) -> dict:
    """What a baseline records: the cell, its inputs, and every capture point's metrics (rounded). Nothing that
    varies between runs on one machine (no times, paths or versions)."""
    points = []
    for p in comparison["points"]:
        row = {"point": p["point"]}
        for m in METRICS:
            if m in p:
                row[m] = _round(p.get(m), m)
        points.append(row)
    return {
        "schema": BASELINE_SCHEMA,
        "schema_version": BASELINE_SCHEMA_VERSION,
        "cell": cell.id,
        "checkpoint": cell.checkpoint,
        "implementation": cell.impl.label,
        "dtype": cell.dtype,
        "device": cell.device,
        "reference": cell.reference.label,
        "branches": branches,
        "tokens": _tokens_identity(tokens),
        "first_above_floor": comparison.get("first_above_floor"),
        "points": points,
    }


def dump_baseline(doc: dict) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n"


def read_baseline(path: Path, cell: Cell, tokens: np.ndarray, branches: bool, matrix: Path, baseline_dir: Path) -> dict:
    rerun = f"If the matrix changed on purpose, run `bughunt ci {matrix} --baseline {baseline_dir} --update-baseline` and review the diff."
    if not path.exists():
        raise BughuntError(f"no baseline for cell {cell.id} ({path}). Record the baselines with "
                           f"`bughunt ci {matrix} --baseline {baseline_dir} --update-baseline`, review them and commit them.")
    doc = read_baseline_json(path, "Restore it, or rerun with --update-baseline.")
    if not isinstance(doc, dict) or doc.get("schema") != BASELINE_SCHEMA:
        raise BughuntError(f"{path} is not a bughunt baseline (no \"schema\": \"{BASELINE_SCHEMA}\"). Remove it, or rerun with --update-baseline.")
    if doc.get("schema_version") != BASELINE_SCHEMA_VERSION:
        raise BughuntError(f"baseline {path} has schema_version {doc.get('schema_version')!r}; this bughunt reads {BASELINE_SCHEMA_VERSION}. {rerun}")
    for key, want in (("cell", cell.id), ("reference", cell.reference.label), ("branches", branches), ("tokens", _tokens_identity(tokens))):
        if doc.get(key) != want:
            what = "input tokens" if key == "tokens" else key
            raise BughuntError(f"baseline {path} was recorded with a different {what} ({doc.get(key)!r}, now {want!r}), "
                               f"so its numbers do not apply to cell {cell.id}. {rerun}")
    if not isinstance(doc.get("points"), list):
        raise BughuntError(f"baseline {path} has no points list. {rerun}")
    check_baseline_points(doc["points"], path, rerun)
    return doc


def _write_file(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------
# Judging a cell
# ------------------------------------------------------------------------------------------------

@dataclass
class Violation:
    point: str  # the capture point it concerns (the worst point of a summary rule)
    detail: str  # "rel_l2 3.2e-03 vs baseline 4.1e-07 (7800x, limit 10x + 1e-06)"
    order: tuple = ()

    @property
    def text(self) -> str:
        return f"{self.point} {self.detail}"


def _value(point: dict, metric: str) -> float | None:
    v = point.get(metric)
    if v is None and metric == "log10_l2":
        return -math.inf  # log10_l2 is null when the difference is exactly zero
    return v


def _badness(metric: str, value: float | None) -> float | None:
    """A linear measure that grows as the metric gets worse: L2 for log10_l2, 1 - x for cosine and top1."""
    if value is None:
        return None
    if metric == "log10_l2":
        return 10.0 ** value
    if metric == "delta_nll":
        return abs(value)
    if metric == "ppl_ratio":
        return abs(value - 1.0)
    if metric == "gen_topk_ok":
        return 1.0 - value
    return 1.0 - value if metric in SIMILARITY_METRICS else value


def _fmt(metric: str, v: float | None) -> str:
    if v is None:
        return "none"
    if metric == "log10_l2":
        return f"{v:.2f}"
    if metric in SIMILARITY_METRICS or metric in ("ppl_ratio", "gen_topk_ok"):
        return f"{v:.6g}"
    if metric == "gen_matched_steps":
        return f"{v:g}"
    return f"{v:.1e}"


def _times(r: float) -> str:
    if math.isinf(r):
        return "from exact agreement"
    if r >= 1e5:
        return f"{r:.1e}x".replace("e+0", "e").replace("e+", "e")  # 2.5e6x
    return f"{r:.0f}x" if r >= 10 else f"{r:.1f}x"


def _baseline_check(rule: Threshold, v: float | None, b: float | None) -> str | None:
    bad_v, bad_b = _badness(rule.metric, v), _badness(rule.metric, b)
    if bad_v is None:
        return f"{rule.metric} is missing in this run (baseline {_fmt(rule.metric, b)})"
    bad_b = max(bad_b or 0.0, 0.0)
    assert rule.baseline_factor is not None
    if bad_v <= rule.baseline_factor * bad_b + rule.slack:
        return None
    ratio = bad_v / bad_b if bad_b > 0 else math.inf
    what = {"cosine": "1 - cosine ", "top1": "1 - top1 ", "log10_l2": "L2 ", "delta_nll": "|delta_nll| ",
            "ppl_ratio": "|ppl_ratio - 1| "}.get(rule.metric, "")
    return (f"{rule.metric} {_fmt(rule.metric, v)} vs baseline {_fmt(rule.metric, b)} "
            f"({what}{_times(ratio)}, limit {rule.baseline_factor:g}x + {rule.slack:g})")


def _absolute_check(rule: Threshold, v: float | None) -> str | None:
    if v is None:
        return f"{rule.metric} is missing in this run"
    if rule.metric == "delta_nll":  # a loss moved either way is a difference
        if rule.max is not None and abs(v) > rule.max:
            return f"|delta_nll| {abs(v):.1e} above the limit {rule.max:g}"
        if rule.min is not None and abs(v) < rule.min:
            return f"|delta_nll| {abs(v):.1e} below the minimum {rule.min:g}"
        return None
    if rule.max is not None and v > rule.max:
        return f"{rule.metric} {_fmt(rule.metric, v)} above the limit {rule.max:g}"
    if rule.min is not None and v < rule.min:
        return f"{rule.metric} {_fmt(rule.metric, v)} below the minimum {rule.min:g}"
    return None


def _reduce(summary: str, rows: list[tuple[str, float]]) -> tuple[str, float]:
    if summary == "max":
        return max(rows, key=lambda r: r[1])
    if summary == "min":
        return min(rows, key=lambda r: r[1])
    return rows[-1][0], float(np.mean([v for _, v in rows]))


def judge_cell(cell: Cell, comparison: dict, baseline: dict | None, thresholds: tuple[Threshold, ...]) -> list[Violation]:
    """Every way the cell misses its baseline or thresholds, in forward order of capture point.
    With no baseline (when recording one), the baseline rules are skipped and the rest still apply."""
    from bughunt.trace import point_order

    current = {p["point"]: p for p in comparison["points"]}
    base = {p["point"]: p for p in baseline["points"]} if baseline else {}
    found: list[Violation] = []

    def add(point: str, detail: str, rule_index: int = -1) -> None:
        found.append(Violation(point, detail, (point_order(point), rule_index)))

    for name, p in current.items():
        if p.get("error"):
            add(name, f"could not be compared: {p['error']}")
        elif p.get("nonfinite"):
            add(name, f"has {p['nonfinite']} NaN/Inf values")
    if baseline:
        for name in base:
            if name not in current:
                add(name, "is in the baseline but missing from this run")
        for name in current:
            if name not in base:
                add(name, "is not in the baseline. If the capture points changed on purpose, rerun with --update-baseline")
    bad = {v.point for v in found}

    for rule in thresholds:
        if not fnmatch.fnmatchcase(cell.id, rule.cells):
            continue
        names = [n for n in current if fnmatch.fnmatchcase(n, rule.points) and n not in bad
                 and (rule.metric not in LOGITS_ONLY or n == "logits")]
        if not names:
            continue
        if rule.summary:
            rows = [(n, _value(current[n], rule.metric)) for n in names]
            if any(v is None for _, v in rows):
                add(names[0], f"{rule.metric} is missing in this run", rule.index)
                continue
            at, v = _reduce(rule.summary, rows)  # type: ignore[arg-type]
            label = f"{rule.summary} over {rule.points}" + (f" (at {at})" if rule.summary != "mean" else "")
            msg = _absolute_check(rule, v) if (rule.max is not None or rule.min is not None) else None
            if msg is None and rule.baseline_factor is not None and baseline:
                brows = [(n, _value(base[n], rule.metric)) for n in names if n in base]
                b = _reduce(rule.summary, brows)[1] if brows and all(x is not None for _, x in brows) else None  # type: ignore[arg-type]
                msg = _baseline_check(rule, v, b)
            if msg:
                add(at, f"{label}: {msg}", rule.index)
            continue
        for n in names:
            p = current[n]
            v = _value(p, rule.metric)
            msg = _absolute_check(rule, v) if (rule.max is not None or rule.min is not None) else None
            if msg is None and rule.floor_factor is not None:
                floor = p.get(FLOOR_OF[rule.metric])
                bad_v = _badness(rule.metric, v)
                if floor is None or bad_v is None:
                    msg = f"{rule.metric} has no noise floor to compare with"
                elif bad_v > rule.floor_factor * floor:
                    what = "|delta_nll|" if rule.metric == "delta_nll" else rule.metric
                    msg = (f"{what} {bad_v:.1e} is {_times(bad_v / floor)} the {cell.dtype} noise floor {floor:.1e} "
                           f"(limit {rule.floor_factor:g}x)")
            if msg is None and rule.baseline_factor is not None and baseline and n in base:
                msg = _baseline_check(rule, v, _value(base[n], rule.metric))
            if msg:
                add(n, msg, rule.index)
    found.sort(key=lambda v: v.order)
    return found


def diagnosis_text(result, candidate: str) -> str | None:
    """The explanation a toggle search attached to the Result (result.data["diagnosis"]), for one candidate.
    Accepts a string, a {"message": ...} table, a table keyed by candidate label, or a list of such entries."""
    d = result.data.get("diagnosis") if result is not None else None
    if not d:
        return None
    if isinstance(d, dict) and candidate in d:
        d = d[candidate]
    elif isinstance(d, list):
        d = [x for x in d if not isinstance(x, dict) or x.get("candidate", x.get("implementation", candidate)) == candidate]
        d = "; ".join(str(x.get("message", x) if isinstance(x, dict) else x) for x in d) or None
    if isinstance(d, dict):
        d = d.get("message") or d.get("summary") or json.dumps(d, sort_keys=True)
    return str(d) if d else None


# ------------------------------------------------------------------------------------------------
# Running the matrix
# ------------------------------------------------------------------------------------------------

@dataclass
class CellOutcome:
    cell: Cell
    status: str  # pass | fail | error (the implementation or the run failed) | skipped (it does not run the family)
    violations: list[Violation] = field(default_factory=list)
    error: str | None = None
    diagnosis: str | None = None
    report: str | None = None  # report.html, relative to the output directory
    seconds: float = 0.0
    max_rel_l2: float | None = None
    max_rel_l2_baseline: float | None = None
    comparison: dict | None = field(default=None, repr=False)  # what a recorded baseline is made from

    @property
    def message(self) -> str:
        if self.status == "error":
            return f"cell {self.cell.id}: {self.error}"
        if self.status == "skipped":
            return f"cell {self.cell.id}: skipped: {self.error}"
        if self.status == "pass":
            return f"cell {self.cell.id}: pass"
        first = self.violations[0]
        more = f" (+{len(self.violations) - 1} more)" if len(self.violations) > 1 else ""
        return f"cell {self.cell.id}: {first.text}{more}"

    @property
    def details(self) -> str:
        lines = [self.message]
        if self.status == "fail":
            lines += [f"  {v.text}" for v in self.violations[:50]]
            if len(self.violations) > 50:
                lines.append(f"  ... and {len(self.violations) - 50} more")
        if self.diagnosis:
            lines.append(f"diagnosis: {self.diagnosis}")
        if self.report:
            lines.append(f"report: {self.report}")
        return "\n".join(lines)


@dataclass
class CiRun:
    matrix: Matrix
    baseline_dir: Path
    out: Path
    update_baseline: bool
    outcomes: list[CellOutcome]
    seconds: float
    written_baselines: list[Path] = field(default_factory=list)
    stale_baselines: list[Path] = field(default_factory=list)
    shard: tuple[int, int] | None = None  # (K, N): this run is shard K of N (see bughunt.ci_shard)
    packages: dict[str, str] = field(default_factory=dict)  # library versions the summary names

    @property
    def failed(self) -> list[CellOutcome]:
        return [o for o in self.outcomes if o.status not in ("pass", "skipped")]

    @property
    def exit_code(self) -> int:
        """0 every cell passes; 1 a regression (or a failed cell among compared ones); 2 nothing could be compared."""
        if self.outcomes and all(o.status in ("error", "skipped") for o in self.outcomes):
            return 2
        return 1 if self.failed else 0


@dataclass
class _Group:
    """One compare run: a checkpoint on a device, every cell's implementation against the reference."""

    entry: CheckpointEntry
    device: str
    path: Path
    tokens: np.ndarray
    cells: list[Cell]
    baselines: dict[str, dict | None]
    text: Any = None  # the bughunt.text.EncodedText the tokens came from, recorded in the group's report
    skipped: dict[str, str] = field(default_factory=dict)  # cell id -> why its implementation does not run the family

    @property
    def name(self) -> str:
        return f"{self.entry.name}-{self.device}"


def _plan(matrix: Matrix, baseline_dir: Path, update: bool) -> list[_Group]:
    """Resolve checkpoints and tokens and read every baseline before anything runs, so bad input fails fast."""
    from bughunt.spec import load_spec
    from bughunt.trace import capture_points

    groups = []
    points_seen: dict[int, bool] = {}
    for entry in matrix.checkpoints:
        where = f"{matrix.source.name}: checkpoint {entry.name}"
        if entry.path is not None and not entry.path.is_dir():
            raise BughuntError(f"{where}: {entry.path} is not a directory. Fix path = (relative paths are relative to {matrix.source}).")
        path = entry.resolve()
        try:
            spec = load_spec(path)
        except BughuntError as e:
            raise BughuntError(f"{where}: {e}") from None
        try:
            tokens, encoded = entry.tokens.encode(spec, path)
        except BughuntError as e:
            raise BughuntError(f"{where}: {e}") from None
        if tokens.max() >= spec.vocab_size:
            raise BughuntError(f"{where}: token id {tokens.max()} is outside the vocabulary [0, {spec.vocab_size}). Fix tokens.ids.")
        points = capture_points(spec.num_layers, matrix.branches)
        cells_all = cells_of(entry)
        for rule in matrix.thresholds:
            matched = [c for c in cells_all if fnmatch.fnmatchcase(c.id, rule.cells)]
            if matched and any(fnmatch.fnmatchcase(p, rule.points) for p in points):
                points_seen[rule.index] = True
        for device in entry.devices:
            require_device(device, f"{where}: devices")
            cells = [c for c in cells_all if c.device == device]
            skipped = {c.id: why for c in cells if (why := family_refusal(c.impl.name, c.impl.python, spec.family))}
            baselines = {c.id: None if update or c.id in skipped else read_baseline(
                baseline_dir / c.baseline_name, c, tokens, matrix.branches, matrix.source, baseline_dir) for c in cells}
            groups.append(_Group(entry, device, path, tokens, cells, baselines, encoded, skipped))
    for rule in matrix.thresholds:
        if rule.index not in points_seen:
            raise BughuntError(f"{matrix.source.name}: thresholds[{rule.index}] ({rule.describe()}) matches no capture point of any cell. "
                               "Fix points (capture points: embed, layer.{i}, layer.{i}.attn, layer.{i}.mlp, final_norm, logits) or cells (e.g. \"llama/hf:bf16/*\").")
    return groups


def assign_shards(sizes: list[int], count: int) -> list[int]:
    """The shard (1-based) of each checkpoint-device group, given each group's number of cells: contiguous runs of
    groups in matrix order, cut so each shard holds about 1/count of the cells (a group goes to the shard its middle
    cell falls in). A group never splits: its cells share one compare run (the reference runs once) and one report."""
    total = sum(sizes)
    out, before = [], 0
    for size in sizes:
        out.append(min(count, (count * (2 * before + size)) // (2 * total) + 1) if total else 1)
        before += size
    return out


def _ci_section(group: _Group, outcomes: list[CellOutcome]) -> dict:
    rows = "".join(f"<tr><td class='l'>{html.escape(o.cell.id)}</td><td class='l'>{o.status}</td>"
                   f"<td class='l'>{html.escape(o.message)}</td></tr>" for o in outcomes)
    return {"title": "CI gate", "html": f"<table><tr><th class='l'>cell</th><th class='l'>status</th><th class='l'>verdict</th></tr>{rows}</table>"}


def _run_group(group: _Group, matrix: Matrix, out: Path, log: Callable[[str], None], pool=None) -> list[CellOutcome]:
    from bughunt import report
    from bughunt.compare import compare

    labels = [c.impl.label for c in group.cells if c.id not in group.skipped] + [group.entry.reference.label]
    t0 = time.perf_counter()
    if len(labels) == 1:
        return [CellOutcome(c, "skipped", error=group.skipped[c.id]) for c in group.cells]
    try:
        result = compare(group.path, labels, reference=group.entry.reference.label, dtype=group.cells[0].dtype,
                         device=group.device, tokens=None if group.text is not None else group.tokens, out=None,
                         branches=matrix.branches, render=False, pool=pool, text=group.text,
                         generate=matrix.generate[0] if matrix.generate else None,
                         top_k=matrix.generate[1] if matrix.generate else 5)
    except BughuntError as e:
        return [CellOutcome(c, "error", error=f"the compare run failed: {e}", seconds=time.perf_counter() - t0) for c in group.cells]
    report_rel = f"reports/{group.name}/report.html"
    outcomes = []
    entries = {e["label"]: e for e in result.data["implementations"]}
    for cell in group.cells:
        if cell.id in group.skipped:
            outcomes.append(CellOutcome(cell, "skipped", error=group.skipped[cell.id]))
            continue
        entry = entries[cell.impl.label]
        timings = (entry.get("meta") or {}).get("timings") or {}
        seconds = float(timings.get("load_s", 0.0) + timings.get("forward_s", 0.0))
        diagnosis = diagnosis_text(result, cell.impl.label)
        if entry["status"] != "ok":
            outcomes.append(CellOutcome(cell, "error", error=f"{cell.impl.label} failed: {entry['error']}", diagnosis=diagnosis,
                                        report=report_rel, seconds=seconds))
            continue
        comparison = result.comparison(cell.impl.label)
        baseline = group.baselines[cell.id]
        violations = judge_cell(cell, comparison, baseline, matrix.thresholds)
        outcome = CellOutcome(cell, "fail" if violations else "pass", violations, diagnosis=diagnosis if violations else None,
                              report=report_rel, seconds=seconds, max_rel_l2=comparison["summary"]["max_rel_l2"], comparison=comparison)
        if baseline:
            outcome.max_rel_l2_baseline = max((p["rel_l2"] for p in baseline["points"] if p.get("rel_l2") is not None), default=None)
        outcomes.append(outcome)
    result.data["extra_sections"] = [*result.data.get("extra_sections", []), _ci_section(group, outcomes)]
    report_dir = out / "reports" / group.name
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "result.json").write_text(result.to_json())
    report.render(result, report_dir)
    log(f"  {group.name}: {sum(o.status == 'pass' for o in outcomes)}/{len(outcomes)} cells pass ({time.perf_counter() - t0:.1f}s)")
    return outcomes


def run_ci(matrix_path: str | Path, baseline_dir: str | Path, update_baseline: bool = False, out: str | Path | None = None,
           log: Callable[[str], None] = print, shard: tuple[int, int] | None = None,
           finish: Callable[[CiRun, Path], None] | None = None) -> CiRun:
    """Run every cell of the matrix, judge it, write the outputs (and, when asked, the baselines). Bad input raises
    BughuntError before anything runs; regressions are in the returned CiRun (exit_code 1). With `shard` = (K, N),
    run only shard K's cells (see `assign_shards`); the whole matrix is still checked, so every shard refuses the same
    bad input. The outputs are built in a temporary directory and moved to `out` when complete (bughunt.output);
    `finish(run, directory)` may add files of its own there first."""
    from bughunt import progress
    from bughunt.result import environment

    t0 = time.perf_counter()
    matrix = load_matrix(matrix_path)
    baseline_dir = Path(baseline_dir)
    if not update_baseline and not baseline_dir.is_dir():
        raise BughuntError(f"baseline directory {baseline_dir} does not exist. Record the baselines with "
                           f"`bughunt ci {matrix.source} --baseline {baseline_dir} --update-baseline`, review them and commit them.")
    out = Path(out) if out is not None else Path("reports") / "ci"
    groups = _plan(matrix, baseline_dir, update_baseline)
    checkpoints = [("the checkpoint", g.path) for g in groups]
    protect = checkpoints + [("the matrix file", matrix.source), ("the baseline directory", baseline_dir)]
    check_output_dir(out, "ci", protect)
    baseline_protect = checkpoints + [("the --out directory", out)]
    if update_baseline:
        if baseline_dir.exists() and not baseline_dir.is_dir():
            raise BughuntError(f"--baseline {baseline_dir} is a file, not a directory. Give the directory that holds (or will hold) "
                               "the baseline files.")
        for g in groups:
            for c in g.cells:
                check_output_file(baseline_dir / c.baseline_name, BASELINE_SCHEMA, baseline_protect, "--baseline")
    todo = groups if shard is None else [g for g, k in zip(groups, assign_shards([len(g.cells) for g in groups], shard[1])) if k == shard[0]]
    slice_ = "" if shard is None else f"shard {shard[0]}/{shard[1]}: {sum(len(g.cells) for g in todo)} of "
    log(f"bughunt ci: {slice_}{sum(len(g.cells) for g in groups)} cells from {matrix.source}"
        + (" (recording baselines)" if update_baseline else f", baselines in {baseline_dir}"))
    if shard is not None and not todo:
        log(f"note: shard {shard[0]}/{shard[1]} has no cells: each checkpoint and device runs whole in one shard, "
            f"and this matrix has {len(groups)}. Use at most {len(groups)} shards.")
    run = CiRun(matrix, baseline_dir, out, update_baseline, [], 0.0, shard=shard, packages=environment()["packages"])
    from bughunt.worker import WorkerPool

    def write(tmp: Path) -> None:
        with WorkerPool() as pool, progress.task("bughunt ci", total=sum(len(g.cells) for g in todo), unit="cell") as bar:
            shown = progress.printer(log)
            for group in todo:  # one worker per implementation and interpreter serves every cell
                bar.update(stage=group.name)
                run.outcomes += _run_group(group, matrix, tmp, shown, pool)
                bar.advance(len(group.cells))
        if update_baseline:  # each file replaced atomically, and only if it is a bughunt baseline (checked above)
            by_id = {g_cell.id: g for g in groups for g_cell in g.cells}
            for o in run.outcomes:
                if o.comparison is None:
                    continue
                path = baseline_dir / o.cell.baseline_name
                write_output_file(path, dump_baseline(baseline_document(o.cell, o.comparison, by_id[o.cell.id].tokens, matrix.branches)),
                                  BASELINE_SCHEMA, baseline_protect, "--baseline")
                run.written_baselines.append(path)
        if baseline_dir.is_dir():
            names = {c.baseline_name for g in groups for c in g.cells}
            run.stale_baselines = sorted(p for p in baseline_dir.glob("*.json") if p.name not in names)
        run.seconds = time.perf_counter() - t0
        write_outputs(run, tmp)
        if finish is not None:
            finish(run, tmp)

    write_output_dir(out, "ci", write, protect)
    outcomes = run.outcomes
    for o in run.failed:
        log(o.details)
    if run.written_baselines:
        log(f"wrote {len(run.written_baselines)} baselines to {baseline_dir}; review the diff and commit them")
    if run.stale_baselines:
        log(f"note: {len(run.stale_baselines)} baseline files belong to no cell of this matrix: "
            f"{', '.join(p.name for p in run.stale_baselines)}. Delete them if the matrix dropped those cells.")
    log(f"{len(outcomes) - len(run.failed)}/{len(outcomes)} cells pass, {len(run.failed)} fail ({run.seconds:.1f}s); "
        f"wrote {out}/summary.md, {out}/junit.xml, {out}/index.html")
    return run


# ------------------------------------------------------------------------------------------------
# Outputs: JUnit XML, Markdown summary, HTML index
# ------------------------------------------------------------------------------------------------

def junit_xml(run: CiRun) -> str:
    failures = sum(o.status == "fail" for o in run.outcomes)
    errors = sum(o.status == "error" for o in run.outcomes)
    total_time = f"{sum(o.seconds for o in run.outcomes):.3f}"
    suites = ET.Element("testsuites", name="bughunt ci", tests=str(len(run.outcomes)), failures=str(failures), errors=str(errors), time=total_time)
    suite = ET.SubElement(suites, "testsuite", name=f"bughunt ci {run.matrix.source.name}", tests=str(len(run.outcomes)),
                          failures=str(failures), errors=str(errors), time=total_time,
                          skipped=str(sum(o.status == "skipped" for o in run.outcomes)))
    for o in run.outcomes:
        case = ET.SubElement(suite, "testcase", classname=f"bughunt.{o.cell.checkpoint}", name=o.cell.id, time=f"{o.seconds:.3f}")
        if o.status == "fail":
            ET.SubElement(case, "failure", message=o.message, type="regression").text = o.details
        elif o.status == "error":
            ET.SubElement(case, "error", message=o.message, type="failed").text = o.details
        elif o.status == "skipped":
            ET.SubElement(case, "skipped", message=o.message)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_summary(run: CiRun) -> str:
    """The Markdown page for a CI job summary. It holds no timings and no output paths, so the merge of a sharded
    run's slices (bughunt.ci_shard) reproduces the unsharded run's page exactly; the times are in junit.xml."""
    n, bad = len(run.outcomes), len(run.failed)
    what = "bughunt ci" if run.shard is None else f"bughunt ci, shard {run.shard[0]} of {run.shard[1]}"
    head = f"## {what}: ✅ all {n} cells pass" if not bad else f"## {what}: ❌ {bad} of {n} cells fail"
    if run.shard is not None and not n:
        head = f"## {what}: no cells (each checkpoint and device runs whole in one shard; the matrix has fewer than {run.shard[1]})"
    pkgs = run.packages
    versions = ", ".join(f"{k} {pkgs[k]}" for k in ("bughunt", "torch", "transformers", "numpy", "jax", "keras") if k in pkgs)
    lines = [head, "",
             f"Matrix `{run.matrix.source}`, " + ("baselines recorded now" if run.update_baseline else f"baselines `{run.baseline_dir}`")
             + f". {versions}.", "",
             "| cell | status | first regressed point | by how much | max rel L2 (baseline) |",
             "|---|---|---|---|---|"]
    for o in run.outcomes:
        status = {"pass": "✅ pass", "fail": "❌ regression", "error": "💥 error", "skipped": "⏭ skipped"}[o.status]
        first, how = "–", "–"
        if o.status == "fail":
            first, how = o.violations[0].point, o.violations[0].detail
        elif o.status in ("error", "skipped"):
            how = o.error or ""
        worst = "–" if o.max_rel_l2 is None else f"{o.max_rel_l2:.1e}"
        if o.max_rel_l2_baseline is not None:
            worst += f" ({o.max_rel_l2_baseline:.1e})"
        lines.append(f"| `{o.cell.id}` | {status} | {_md(first)} | {_md(how)} | {worst} |")
    for o in run.failed:
        lines += ["", f"<details><summary>{html.escape(o.message)}</summary>", "", "```", o.details, "```", "", "</details>"]
    lines += ["", "Thresholds:", *[f"- {t.describe()}" for t in run.matrix.thresholds],
              "", "HTML reports: `index.html` beside this file (one report per checkpoint and device)."]
    if run.stale_baselines:
        lines += ["", f"Baseline files that belong to no cell: {', '.join(f'`{p.name}`' for p in run.stale_baselines)}."]
    return "\n".join(lines) + "\n"


def index_html(run: CiRun) -> str:
    rows = []
    for o in run.outcomes:
        link = f"<a href='{html.escape(o.report)}'>report</a>" if o.report else "–"
        rows.append(f"<tr><td>{html.escape(o.cell.id)}</td><td class='{o.status}'>{o.status}</td>"
                    f"<td>{html.escape(o.message if o.status != 'pass' else '')}</td><td>{link}</td></tr>")
    verdict = "all cells pass" if not run.failed else f"{len(run.failed)} of {len(run.outcomes)} cells fail"
    if run.shard is not None:
        verdict = f"shard {run.shard[0]} of {run.shard[1]}, {verdict}"
    return ("<!doctype html><meta charset='utf-8'><title>bughunt ci</title>"
            "<style>body{font-family:sans-serif}td,th{padding:3px 8px;text-align:left}.pass{color:#2a7}.fail,.error{color:#c22;font-weight:bold}</style>"
            f"<h1>bughunt ci: {verdict}</h1><p>Matrix {html.escape(str(run.matrix.source))}; "
            f"{'baselines recorded now' if run.update_baseline else 'baselines ' + html.escape(str(run.baseline_dir))}.</p>"
            "<table border=1 style='border-collapse:collapse'><tr><th>cell</th><th>status</th><th>first regression</th><th>report</th></tr>"
            + "".join(rows) + "</table>\n")


def write_outputs(run: CiRun, directory: Path | None = None) -> None:
    """JUnit XML, the Markdown summary and the HTML index, into `directory` (default run.out)."""
    directory = Path(directory) if directory is not None else run.out
    directory.mkdir(parents=True, exist_ok=True)
    _write_file(directory / "junit.xml", junit_xml(run))
    _write_file(directory / "summary.md", markdown_summary(run))
    _write_file(directory / "index.html", index_html(run))
