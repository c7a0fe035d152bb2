"""Capture-point names, one scheme everywhere (traces, result.json, plots, CLI flags): `embed`, `layer.{i}`,
`layer.{i}.attn`, `layer.{i}.mlp`, the points inside them (`layer.{i}.attn.q`, ...), `final_norm`, `logits`.
`name(...)` builds one and `parse(...)` reads one; nobody writes the f-string by hand."""

from __future__ import annotations

from dataclasses import dataclass

EMBED = "embed"
FINAL_NORM = "final_norm"
LOGITS = "logits"
BRANCHES = ("attn", "mlp")
# the points inside a branch, in the order a layer computes them
INNER = {"attn": ("q", "k", "scores", "probs", "out"), "mlp": ("hidden",)}


@dataclass(frozen=True)
class Point:
    """A parsed capture point: `layer` is None for embed, final_norm and logits; `branch` is attn or mlp; `inner` is a
    point inside the branch (q, k, scores, probs, out, hidden)."""

    name: str
    layer: int | None = None
    branch: str | None = None
    inner: str | None = None

    @property
    def is_layer_output(self) -> bool:
        """The residual stream leaving a decoder layer (`layer.{i}`)."""
        return self.layer is not None and self.branch is None

    @property
    def is_inner(self) -> bool:
        return self.inner is not None


def name(layer: int | None = None, branch: str | None = None, inner: str | None = None, *, special: str | None = None) -> str:
    """The name of a capture point: name(special=EMBED), name(3) -> 'layer.3', name(3, 'attn') -> 'layer.3.attn',
    name(3, 'attn', 'q') -> 'layer.3.attn.q'."""
    if special is not None:
        if special not in (EMBED, FINAL_NORM, LOGITS):
            raise ValueError(f"unknown capture point {special!r}")
        return special
    if layer is None or int(layer) < 0:
        raise ValueError(f"a decoder layer's point needs a layer index >= 0, got {layer!r}")
    parts = ["layer", str(int(layer))]
    if branch is not None:
        if branch not in BRANCHES:
            raise ValueError(f"unknown branch {branch!r}; use one of {BRANCHES}")
        parts.append(branch)
        if inner is not None:
            if inner not in INNER[branch]:
                raise ValueError(f"unknown point {inner!r} inside {branch}; use one of {INNER[branch]}")
            parts.append(inner)
    elif inner is not None:
        raise ValueError("a point inside a layer names its branch too")
    return ".".join(parts)


def layer(i: int) -> str:
    """`layer.{i}`: the residual stream leaving decoder layer i."""
    return name(i)


def branch(i: int, which: str) -> str:
    """`layer.{i}.attn` or `layer.{i}.mlp`: a branch's output before it is added to the residual stream."""
    return name(i, which)


def inner(i: int, which: str, point: str) -> str:
    """A point inside a branch, e.g. `layer.{i}.attn.scores`."""
    return name(i, which, point)


def parse(text: str) -> Point:
    """Read a capture point's name; ValueError when it is not one."""
    if text in (EMBED, FINAL_NORM, LOGITS):
        return Point(text)
    parts = text.split(".")
    if len(parts) < 2 or parts[0] != "layer" or not parts[1].isdigit() or len(parts) > 4:
        raise ValueError(f"{text!r} is not a capture point (embed, layer.N, layer.N.attn, layer.N.mlp, ..., final_norm, logits)")
    b = parts[2] if len(parts) > 2 else None
    i = parts[3] if len(parts) > 3 else None
    if name(int(parts[1]), b, i) != text:  # checks the branch and inner names, and refuses 'layer.01'
        raise ValueError(f"{text!r} is not a capture point")
    return Point(text, int(parts[1]), b, i)


def layer_of(text: str) -> int | None:
    """The decoder layer a point belongs to (None for embed, final_norm, logits and names that are not points)."""
    try:
        return parse(text).layer
    except ValueError:
        return None


def is_layer_output(text: str) -> bool:
    """Whether `text` is `layer.{i}` (the residual stream leaving a layer, not a branch or an inner point)."""
    try:
        return parse(text).is_layer_output
    except ValueError:
        return False


def is_branch_output(text: str) -> bool:
    """Whether `text` is `layer.{i}.attn` or `layer.{i}.mlp` (a branch's output, not a point inside it)."""
    try:
        point = parse(text)
    except ValueError:
        return False
    return point.branch is not None and point.inner is None


def is_inner(text: str) -> bool:
    """Whether `text` is a point inside a branch (`layer.{i}.attn.q`, ...)."""
    try:
        return parse(text).is_inner
    except ValueError:
        return False
