"""The `bughunt ci` matrix file: its grammar as pydantic models, and the frozen Matrix a run is planned from. A bad
matrix is one BughuntError naming the file, the table and key, what was found and what to write instead."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, ValidationError,
                      ValidationInfo, model_validator)
from pydantic_core import PydanticCustomError

from bughunt.errors import BughuntError
from bughunt.hub import looks_like_hub_id
from bughunt.generation import DEFAULT_TOP_K, MAX_STEPS
from bughunt.implementations import DEVICES, DTYPES, ImplChoice, available
from bughunt.inputs.config import MAX_TOKEN_ID
from bughunt.inputs.documents import read_toml
from bughunt.inputs.files import location
from bughunt.metric_table import METRICS
from bughunt.tiny import TINY_FAMILIES

DEFAULT_TOKENS = {"length": 16, "seed": 0}
MAX_TOKENS = 1_000_000  # input length a cell may ask for (far beyond any context a CI cell runs)
SUMMARIES = ("max", "min", "mean")
TEXT_KEYS = ("prompt", "prompt_file", "chat")

# Used when a matrix has no [[thresholds]]: a regression is a metric 10x worse than its baseline, with an
# absolute slack so the last bits of fp32 noise never flake.
DEFAULT_THRESHOLDS = (
    {"metric": "rel_l2", "baseline_factor": 10.0, "slack": 1e-6},
    {"metric": "kl", "baseline_factor": 10.0, "slack": 1e-6},
    {"metric": "top1", "baseline_factor": 10.0, "slack": 0.1},
)
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


# ------------------------------------------------------------------------------------------------
# What a run is planned from
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
        from bughunt.plan import default_tokens

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
        from bughunt import sources

        return sources.resolve(self.path)  # a directory, a GGUF file's view or a hub id's snapshot


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
        metric = METRICS[self.metric]
        where = f"{self.summary} over {self.points}" if self.summary else f"at {self.points}"
        limits = []
        if self.max is not None:
            limits.append(f"<= {self.max:g}")
        if self.min is not None:
            limits.append(f">= {self.min:g}")
        if self.floor_factor is not None:
            limits.append(f"<= {self.floor_factor:g}x the noise floor")
        if metric.bounds_magnitude:
            limits = [f"|{self.metric}| {x}" for x in limits]
        if self.baseline_factor is not None:
            limits.append(f"{metric.judged_as} <= {self.baseline_factor:g}x baseline + {self.slack:g}")
        cells = "" if self.cells == "*" else f" (cells {self.cells})"
        return f"{self.metric} {where}{cells}: " + ", ".join(limits)


@dataclass(frozen=True)
class Matrix:
    source: Path
    checkpoints: tuple[CheckpointEntry, ...]
    thresholds: tuple[Threshold, ...]
    branches: bool = True
    generate: tuple[int, int] | None = None  # (steps, top_k): each cell also generates greedily


# ------------------------------------------------------------------------------------------------
# The file's grammar
# ------------------------------------------------------------------------------------------------

def _refuse(message: str, key: str | None = None) -> PydanticCustomError:
    """A problem found while validating, worded for the user; `key` names the key of the table it concerns."""
    return PydanticCustomError("matrix", "{message}", {"message": message, "key": key})


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}.get(type(v), type(v).__name__)


def _found(v: Any) -> str:
    text = repr(v)
    return f"{_type_name(v)} {text if len(text) <= 80 else text[:80] + '...'}"


def _one_of(allowed: tuple[str, ...], what: str) -> AfterValidator:
    def check(v: str) -> str:
        if v not in allowed:
            raise _refuse(f"'{v}' is not a {what}. Use one of: {', '.join(allowed)}.")
        return v

    return AfterValidator(check)


def _as_tuple(v: Any) -> Any:
    """A TOML array becomes a tuple (validated strictly as one), so what a table holds cannot change."""
    return tuple(v) if isinstance(v, list) else v


def _distinct(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


def _impl_choice(v: Any) -> ImplChoice:
    if not isinstance(v, str) or not v:
        raise _refuse(f"must be a non-empty string, found {_found(v)}.")
    try:
        return ImplChoice.parse(v)
    except BughuntError as e:
        raise _refuse(str(e)) from None


def _implementation(v: Any) -> ImplChoice:
    choice = _impl_choice(v)
    if choice.dtype is not None:
        raise _refuse(f"'{v}' names a dtype; list implementations without one (e.g. '{choice.name}') "
                      f"and put the dtypes in dtypes = [...], so every implementation runs at every dtype.")
    if choice.python is None and not available(choice.name):
        from bughunt.envs import OWN_ENVIRONMENTS, require_own_python

        if choice.name in OWN_ENVIRONMENTS:
            try:
                require_own_python(choice.name)
            except BughuntError as e:
                raise _refuse(str(e)) from None
        raise _refuse(f"implementation '{choice.name}' is not installed here. Install it, "
                      f"or run it in another interpreter with '{choice.name}@/path/to/python'.")
    return choice


def _once_each(choices: tuple[ImplChoice, ...]) -> tuple[ImplChoice, ...]:
    labels = [c.label for c in choices]
    if len(set(labels)) != len(labels):
        raise _refuse(f"an implementation is listed twice ({labels}). List each once.")
    return choices


def _reference(v: Any) -> ImplChoice:
    choice = _impl_choice(v)
    if choice.dtype is None and choice.name != "reference":
        raise _refuse(f"give the reference a dtype, e.g. '{choice.name}:fp32' "
                      "(only the float64 'reference' implementation has a default dtype).")
    return choice


def _tiny_family(v: str) -> str:
    if v not in TINY_FAMILIES:
        raise _refuse(f"no tiny checkpoint for family '{v}'. Choose one of: {', '.join(TINY_FAMILIES)}.")
    return v


def _rows(v: Any) -> Any:
    """ids = [2, 17, 99] is one row; anything but a non-empty list of non-empty lists is refused with an example."""
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        return (tuple(v),)
    if not isinstance(v, list) or not v or not all(isinstance(r, list) and r for r in v):
        raise _refuse(f"must be a non-empty list of token ids, or a list of equal-length rows, e.g. ids = [[2, 17, 99]]; found {v!r}.")
    return tuple(tuple(r) for r in v)


def _equal_rows(rows: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    if len({len(r) for r in rows}) != 1:
        raise _refuse(f"every row must have the same length; found lengths {[len(r) for r in rows]}.")
    return rows


def _strings(v: Any, info: ValidationInfo) -> str | list[str]:
    if isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(x, str) for x in v)):
        return v
    raise _refuse(f"must be a string or a non-empty list of strings, e.g. {info.field_name} = \"...\"; found {_found(v)}.")


def _known_metric(v: str) -> str:
    if v not in METRICS:
        close = difflib.get_close_matches(v, METRICS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise _refuse(f"unknown metric '{v}'.{hint} Use one of: {', '.join(METRICS)}.")
    return v


Text = Annotated[str, Field(min_length=1)]
Id = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
Number = Annotated[float, Field(allow_inf_nan=False)]
Reference = Annotated[ImplChoice, PlainValidator(_reference)]
Implementations = Annotated[tuple[Annotated[ImplChoice, PlainValidator(_implementation)], ...], BeforeValidator(_as_tuple),
                            Field(min_length=1), AfterValidator(_once_each)]
Dtypes = Annotated[tuple[Annotated[str, _one_of(DTYPES, "dtype")], ...], BeforeValidator(_as_tuple), Field(min_length=1),
                   AfterValidator(_distinct)]
Devices = Annotated[tuple[Annotated[str, _one_of(DEVICES, "device")], ...], BeforeValidator(_as_tuple), Field(min_length=1),
                    AfterValidator(_distinct)]
Strings = Annotated[str | list[str], PlainValidator(_strings)]


class _Table(BaseModel):
    """A TOML table: its keys are the fields. Values are taken as TOML typed them (strict: "0" is not 0)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = list(cls.model_fields)
            for key in data:
                if key not in known:
                    close = difflib.get_close_matches(str(key), known, n=1)
                    hint = f" Did you mean '{close[0]}'?" if close else ""
                    raise _refuse(f"unknown key '{key}'.{hint} Allowed keys: {', '.join(known)}.")
        return data


class TokensTable(_Table):
    ids: Annotated[tuple[tuple[Id, ...], ...], BeforeValidator(_rows), AfterValidator(_equal_rows)] | None = None
    length: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = None
    seed: Id | None = None
    prompt: Strings | None = None
    prompt_file: Strings | None = None
    chat: Text | None = None

    @model_validator(mode="after")
    def _one_source(self) -> TokensTable:
        drawn = self.length is not None or self.seed is not None
        if any(getattr(self, k) is not None for k in TEXT_KEYS) and (self.ids is not None or drawn):
            raise _refuse("give either text (prompt, prompt_file, chat) or ids, or length and seed; not both.")
        if self.ids is not None and drawn:
            raise _refuse("give either ids, or length and seed, not both.")
        return self


class GenerateTable(_Table):
    steps: Annotated[int, Field(ge=1, le=MAX_STEPS)]
    top_k: Annotated[int, Field(ge=1, le=MAX_TOKEN_ID)] = DEFAULT_TOP_K


class CheckpointTable(_Table):
    name: Text | None = None
    path: Text | None = None
    tiny: Annotated[str, AfterValidator(_tiny_family)] | None = None
    seed: Id | None = None
    trained: bool | None = None
    reference: Reference | None = None
    implementations: Implementations | None = None
    dtypes: Dtypes | None = None
    devices: Devices | None = None
    tokens: TokensTable | None = None

    @property
    def cell_name(self) -> str:
        """The name its cells and baseline files carry: `name`, or one made from the family and seed, or the path."""
        if self.name is not None:
            return self.name
        if self.tiny is not None:
            seed = self.seed or 0
            return (self.tiny if seed == 0 else f"{self.tiny}-seed{seed}") + ("-trained" if self.trained else "")
        return Path(os.path.expanduser(self.path or "")).name

    @model_validator(mode="after")
    def _one_source(self) -> CheckpointTable:
        if (self.path is None) == (self.tiny is None):
            raise _refuse("give exactly one of path = \"dir\" (a Hugging Face-format checkpoint) "
                          f"or tiny = \"family\" (a generated tiny checkpoint; families: {', '.join(TINY_FAMILIES)}).")
        for key in ("seed", "trained"):
            if self.path is not None and getattr(self, key) is not None:
                raise _refuse("must not be set for a path: it applies only to tiny checkpoints; remove it or use tiny = \"family\".", key)
        if not self.cell_name or not set(self.cell_name) <= _NAME_CHARS:
            raise _refuse(f"'{self.cell_name}' may hold only letters, digits, '.', '_' and '-' (it names cells and files). "
                          "Set name = \"...\".", "name")
        return self


class ThresholdTable(_Table):
    metric: Annotated[str, AfterValidator(_known_metric)]
    points: Text | None = None  # default "*", or "logits" for a logits-only metric
    cells: Text = "*"
    summary: Annotated[str, _one_of(SUMMARIES, "summary")] | None = None
    max: Number | None = None
    min: Number | None = None
    floor_factor: Annotated[float, Field(allow_inf_nan=False, gt=0)] | None = None
    baseline_factor: Annotated[float, Field(allow_inf_nan=False, ge=1)] | None = None  # how many times worse is allowed
    slack: Annotated[float, Field(allow_inf_nan=False, ge=0)] | None = None

    @model_validator(mode="after")
    def _limits(self) -> ThresholdTable:
        metric = METRICS[self.metric]
        if metric.logits_only and self.points is not None and not fnmatch.fnmatchcase("logits", self.points):
            raise _refuse(f"{self.metric} exists only at the logits capture point, but points = \"{self.points}\" does not match it. "
                          "Set points = \"logits\".")
        if self.max is None and self.min is None and self.floor_factor is None and self.baseline_factor is None:
            raise _refuse("no limit given. Add at least one of max, min (absolute), floor_factor (x the noise floor) "
                          "or baseline_factor (x the baseline value, with slack).")
        if self.floor_factor is not None and metric.floor is None:
            floors = [m.name for m in METRICS.values() if m.floor]
            raise _refuse(f"noise floors exist for {' and '.join(floors)}; use it with "
                          + " or ".join(f"metric = \"{m}\"" for m in floors) + ".", "floor_factor")
        if self.floor_factor is not None and self.summary is not None:
            raise _refuse("must not be combined with summary: it judges each capture point against its own floor; remove summary.",
                          "floor_factor")
        if self.baseline_factor is not None and metric.perfect is None:
            raise _refuse(f"{self.metric} is a count, not an error that grows; bound it with min = N (or max = N) "
                          "instead of baseline_factor.")
        if self.slack is not None and self.baseline_factor is None:
            raise _refuse("must come with baseline_factor: it is the absolute slack of a baseline_factor rule; add baseline_factor "
                          "or remove slack.", "slack")
        return self


class MatrixFile(_Table):
    reference: Reference = Field(default="reference", validate_default=True)
    implementations: Implementations = Field(default=["hf"], validate_default=True)
    dtypes: Dtypes = Field(default=["fp32"], validate_default=True)
    devices: Devices = Field(default=["cpu"], validate_default=True)
    tokens: TokensTable | None = None
    branches: bool = True
    generate: GenerateTable | None = None
    checkpoints: Annotated[list[CheckpointTable], Field(min_length=1)]
    thresholds: Annotated[list[ThresholdTable], Field(min_length=1)] = Field(
        default_factory=lambda: [dict(t) for t in DEFAULT_THRESHOLDS], validate_default=True)

    def setting(self, table: CheckpointTable, key: str) -> Any:
        """A checkpoint's own value for `key`, or the matrix's default."""
        own = getattr(table, key)
        return getattr(self, key) if own is None else own

    @model_validator(mode="after")
    def _whole(self) -> MatrixFile:
        names = [c.cell_name for c in self.checkpoints]
        for name in names:
            if names.count(name) > 1:
                raise _refuse(f"two checkpoints are named '{name}'. Give them distinct name = \"...\" keys.")
        for i, c in enumerate(self.checkpoints):
            reference = self.setting(c, "reference")
            for impl in self.setting(c, "implementations"):
                for dtype in self.setting(c, "dtypes"):
                    if dataclasses.replace(impl, dtype=dtype).label == reference.label or (
                            impl.name == reference.name == "reference" and reference.dtype is None and dtype == "fp64"):
                        raise _refuse(f"checkpoints[{i}] ({names[i]}): {impl.name} at {dtype} is the reference itself. "
                                      "Drop that dtype or implementation, or choose another reference.")
        for i, rule in enumerate(self.thresholds):
            if METRICS[rule.metric].needs_generation and self.generate is None:
                raise _refuse(f"thresholds[{i}] judges {rule.metric}, which needs generation. Add "
                              "generate = { steps = 8, top_k = 5 } at the top of the matrix, or remove the rule.")
        return self


# ------------------------------------------------------------------------------------------------
# A ValidationError in the user's words (the one place it is worded)
# ------------------------------------------------------------------------------------------------

_MISSING = {
    "checkpoints": "no checkpoints. Add at least one [[checkpoints]] table with path = \"dir\" or tiny = \"llama\".",
    "metric": f"missing key 'metric'. Add metric = \"rel_l2\" (one of: {', '.join(METRICS)}).",
    "steps": "missing key 'steps' (how many tokens each implementation generates), e.g. steps = 8.",
}
_LISTS = {
    "implementations": "a non-empty list of strings, e.g. implementations = [\"hf\"]",
    "dtypes": "a non-empty list of strings, e.g. dtypes = [\"fp32\", \"bf16\"]",
    "devices": "a non-empty list of strings, e.g. devices = [\"cpu\"]",
    "checkpoints": "a list of tables ([[checkpoints]])",
    "thresholds": "a list of tables ([[thresholds]]), or no thresholds key at all for the defaults",
}
_TABLES = {
    "checkpoints": "a table ([[checkpoints]] with path = ... or tiny = ...)",
    "thresholds": "a table ([[thresholds]] with metric = ... and a limit)",
    "tokens": "a table, e.g. { length = 16, seed = 0 }, { ids = [[2, 17, 99]] } or { prompt = \"Hello\" }",
    "generate": "a table, e.g. generate = { steps = 8, top_k = 5 }",
}
_BOUNDS = {"greater_than_equal": ("at least", "ge"), "less_than_equal": ("at most", "le"), "greater_than": ("greater than", "gt")}


def _phrase(error: dict, key: str) -> str:
    """What is wrong with the value at the error's location, as a phrase that follows the key."""
    kind, v, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "matrix":
        return ctx["message"]
    if kind == "int_type":
        return f"must be an integer, found {_found(v)}."
    if kind in ("float_type", "finite_number"):
        return f"must be a finite number, found {_type_name(v)} {str(v)[:40]}."
    if kind == "bool_type":
        return f"must be true or false, found {_found(v)}."
    if kind in ("string_type", "string_too_short"):
        return f"must be a non-empty string, found {_found(v)}."
    if kind in ("list_type", "tuple_type", "too_short"):
        return f"must be {_LISTS.get(key, 'a non-empty list')}; found {_found(v)}."
    if kind in ("model_type", "dict_type"):
        return f"must be {_TABLES.get(key, 'a table')}; found {_found(v)}."
    if kind in _BOUNDS:
        words, name = _BOUNDS[kind]
        bound = ctx[name]
        return f"must be {words} {f'{bound:g}' if isinstance(bound, float) else bound}, found {v}."
    return f"{error['msg']}; found {_found(v)}."


def _matrix_error(error: ValidationError, source: Path) -> BughuntError:
    """The first problem pydantic found, as 'FILE: table[i].key must be ...' or 'FILE: table[i]: what to do'."""
    first = error.errors(include_url=False)[0]
    loc = list(first["loc"])
    if (first.get("ctx") or {}).get("key"):
        loc.append(first["ctx"]["key"])
    if first["type"] in ("missing", "extra_forbidden"):
        key = str(loc.pop())
        text = _MISSING.get(key, f"missing key '{key}'.") if first["type"] == "missing" else f"unknown key '{key}'."
    else:
        text = _phrase(first, next((p for p in reversed(loc) if isinstance(p, str)), ""))
    where = f"{source.name}: {location(tuple(loc))}" if loc else source.name
    return BughuntError(where + (" " if text.startswith("must ") else ": ") + text)


# ------------------------------------------------------------------------------------------------
# From the file to the Matrix
# ------------------------------------------------------------------------------------------------

def _tokens(table: TokensTable | None, where: str, base_dir: Path) -> Tokens:
    if table is None:
        return Tokens()
    if any(getattr(table, k) is not None for k in TEXT_KEYS):
        from bughunt.text import request_from_table

        return Tokens(text=request_from_table(table.model_dump(include=set(TEXT_KEYS), exclude_none=True), where, base_dir))
    if table.ids is not None:
        return Tokens(ids=table.ids)
    return Tokens(length=DEFAULT_TOKENS["length"] if table.length is None else table.length,
                  seed=DEFAULT_TOKENS["seed"] if table.seed is None else table.seed)


def _entry(file: MatrixFile, index: int, tokens: Tokens, source: Path) -> CheckpointEntry:
    table = file.checkpoints[index]
    path = None
    if table.path is not None:
        path = Path(os.path.expanduser(table.path))
        path = path if path.is_absolute() or not (source.parent / path).exists() and looks_like_hub_id(table.path) else source.parent / path
    own_tokens = table.tokens is not None
    return CheckpointEntry(
        name=table.cell_name, path=path, tiny=table.tiny, seed=table.seed or 0, reference=file.setting(table, "reference"),
        implementations=file.setting(table, "implementations"), dtypes=file.setting(table, "dtypes"),
        devices=file.setting(table, "devices"), trained=bool(table.trained),
        tokens=_tokens(table.tokens, f"{source.name}: checkpoints[{index}].tokens", source.parent) if own_tokens else tokens)


def _threshold(table: ThresholdTable, index: int) -> Threshold:
    points = table.points or ("logits" if METRICS[table.metric].logits_only else "*")
    return Threshold(index=index, metric=table.metric, points=points, cells=table.cells, summary=table.summary,
                     max=table.max, min=table.min, floor_factor=table.floor_factor, baseline_factor=table.baseline_factor,
                     slack=table.slack or 0.0)


def parse_matrix(data: dict, source: Path) -> Matrix:
    """Validate a parsed TOML document strictly; every problem is a BughuntError naming the key and the fix."""
    try:
        file = MatrixFile.model_validate(data)
    except ValidationError as e:
        raise _matrix_error(e, source) from None
    tokens = _tokens(file.tokens, f"{source.name}: tokens", source.parent)
    return Matrix(source=source, checkpoints=tuple(_entry(file, i, tokens, source) for i in range(len(file.checkpoints))),
                  thresholds=tuple(_threshold(t, i) for i, t in enumerate(file.thresholds)), branches=file.branches,
                  generate=(file.generate.steps, file.generate.top_k) if file.generate else None)


def load_matrix(path: str | Path) -> Matrix:
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise BughuntError(f"matrix file {path} does not exist. Write one (see examples/bughunt.toml) or fix the path.")
    return parse_matrix(read_toml(path), path)
