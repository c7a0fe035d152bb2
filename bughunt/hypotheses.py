"""Ignored-field hypotheses: for each numerics-relevant field of a checkpoint's config.json, what an implementation
would compute if it ignored the field or took it from elsewhere.

They are generated from the config and the family, not from a list of known cases: the config is read again
(spec.py's `spec_from_config`) with one field changed, and whatever spec.py then falls back to is the hypothesis:
- "ignored": the field deleted, so the family's default or a value derived from other fields applies (head_dim from
  hidden/heads, the query scale from head_dim, the family's layer pattern, no soft-cap, no RoPE scaling);
- "absent": the field set to null, where that differs from deleting it (untied embeddings, no attention biases);
- for a per-layer pattern (a list with one entry per layer, like layer_types): each constant pattern, e.g.
  "all:full_attention" and "all:sliding_attention".
A change is kept when it moves a field the forward pass reads; fields that set the weights' shapes keep theirs (the
weights cannot follow), so ignoring head_dim moves only what is derived from it. Each becomes a toggle
`field:<path>` (see toggles.py) that the reference applies and the search tries."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from bughunt.errors import BughuntError
from bughunt.spec import Spec, rope_problems, spec_from_config

PREFIX = "field:"
CONFIG = "config"  # the field as config.json gives it
IGNORED = "ignored"
ABSENT = "absent"
ALL = "all:"

# Spec fields the forward passes read (the rest are shapes, token ids or notes).
NUMERICS = ("activation", "rms_eps", "layer_types", "sliding_window", "rope", "attn_softcap", "final_softcap", "query_scale",
            "embed_scale", "attention_bias", "tie_word_embeddings", "max_position_embeddings", "original_max_position_embeddings")
_LENGTH_DEPENDENT_ROPE = ("dynamic", "yarn", "longrope")  # the only RoPE types that read the position limits
_NOT_FIELDS = ("architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "auto_map")


@dataclass(frozen=True)
class Hypothesis:
    """One way an implementation may read one config field: the toggle `field:<path>=<value>`."""

    path: str  # dotted path into config.json, e.g. "query_pre_attn_scalar" or "rope_parameters.full_attention.rope_type"
    value: str  # IGNORED, ABSENT or "all:<entry>"
    changes: dict  # spec field -> the value it takes under this hypothesis (only the fields that move)
    description: str  # "behaves as if it ignored query_pre_attn_scalar (query_scale 0.2041 -> 0.25)"

    @property
    def toggle(self) -> str:
        return PREFIX + self.path


def _paths(cfg: dict, prefix: str = "") -> list[str]:
    """Every field and nested field of a config, parents before their children."""
    out = []
    for key, value in cfg.items():
        if not prefix and key in _NOT_FIELDS:
            continue
        path = prefix + key
        out.append(path)
        if isinstance(value, dict):
            out.extend(_paths(value, path + "."))
    return out


def _edit(cfg: dict, path: str, edit) -> dict:
    """A deep copy of cfg with edit(parent_dict, key) applied at path."""
    cfg = copy.deepcopy(cfg)
    *parents, key = path.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    edit(node, key)
    return cfg


def _get(cfg: dict, path: str):
    node = cfg
    for p in path.split("."):
        node = node[p]
    return node


def config_with(cfg: dict, path: str, value: str, num_layers: int) -> dict:
    """The config an implementation would act on under hypothesis `value` for the field at `path`."""
    if value == IGNORED:
        return _edit(cfg, path, lambda node, key: node.pop(key))
    if value == ABSENT:
        return _edit(cfg, path, lambda node, key: node.__setitem__(key, None))
    if value.startswith(ALL):
        return _edit(cfg, path, lambda node, key: node.__setitem__(key, [value[len(ALL):]] * num_layers))
    raise BughuntError(f"toggle {PREFIX}{path}={value!r}: allowed values are {CONFIG}, {IGNORED}, {ABSENT} or {ALL}<entry>.")


def numerics_changes(spec: Spec, other: Spec) -> dict:
    """The forward-pass fields `other` sets differently from `spec` (position limits only where RoPE reads them;
    a tied spec cannot become untied: the checkpoint has no separate output embedding to use)."""
    out = {f: getattr(other, f) for f in NUMERICS if getattr(other, f) != getattr(spec, f)}
    if not any(r.type in _LENGTH_DEPENDENT_ROPE for r in list(spec.rope.values()) + list(other.rope.values())):
        out.pop("max_position_embeddings", None)
        out.pop("original_max_position_embeddings", None)
    if spec.tie_word_embeddings and out.get("tie_word_embeddings") is False:
        return {}
    # every config field here is read per family: a hypothesis that changes the family is not one about a field
    return out


def _show(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, tuple) and v and all(isinstance(x, str) for x in v):
        return "[" + ",".join(x[0] for x in v) + "]"  # layer_types: f = full, s = sliding
    if isinstance(v, dict):  # rope per layer kind
        return "{" + ", ".join(f"{k}: theta {r.theta:.4g}, {r.type}" + (f" x{r.factor:g}" if r.type != "default" else "")
                               + (f", rotary {r.partial_rotary_factor:g}" if r.partial_rotary_factor != 1.0 else "")
                               for k, r in sorted(v.items())) + "}"
    return str(v)


def describe(path: str, value: str, spec: Spec, changes: dict) -> str:
    what = {IGNORED: f"as if it ignored {path}", ABSENT: f"as if {path} were absent",
            }.get(value, f"as if {path} were {value[len(ALL):]} on every layer" if value.startswith(ALL) else f"{path}={value}")
    moved = "; ".join(f"{k} {_show(getattr(spec, k))} -> {_show(v)}" for k, v in changes.items())
    return f"{what} ({moved})"


def hypotheses(spec: Spec) -> list[Hypothesis]:
    """Every ignored-field hypothesis that moves this spec's numerics, one per (field, value), in config order."""
    cfg = spec.source
    if not cfg:
        return []
    out: list[Hypothesis] = []
    for path in _paths(cfg):
        current = _get(cfg, path)
        values = [IGNORED]
        if current is not None:
            values.append(ABSENT)
        if isinstance(current, list) and len(current) == spec.num_layers and len(set(map(str, current))) > 1:
            values += [ALL + str(v) for v in dict.fromkeys(map(str, current))]
        seen: list[dict] = []
        for value in values:
            changes = changes_for(spec, {path: value})
            if changes is None or not changes or changes in seen:
                continue
            seen.append(changes)
            out.append(Hypothesis(path, value, changes, describe(path, value, spec, changes)))
    return out


def changes_for(spec: Spec, chosen: dict[str, str]) -> dict | None:
    """The spec fields that move when the fields in `chosen` (path -> value) are read as the values say, all at once;
    None when the config then cannot be read at all (a required field deleted)."""
    cfg = spec.source
    if cfg is None:
        return None
    for path, value in sorted(chosen.items()):  # parents first: a field inside one already ignored is ignored with it
        if value == CONFIG:
            continue
        try:
            cfg = config_with(cfg, path, value, spec.num_layers)
        except (KeyError, TypeError):
            continue
    try:
        other = spec_from_config(cfg)
    except (BughuntError, TypeError, ValueError, KeyError, AttributeError):  # spec.py trusts validated fields' types
        return None
    if rope_problems(other):  # e.g. longrope factors for a rotary width the hypothesis changed
        return None
    return numerics_changes(spec, other)


def apply(spec: Spec, chosen: dict[str, str]) -> Spec:
    """The spec as an implementation that reads the chosen fields that way would see it (toggle names without
    the prefix -> values); weights' shapes stay."""
    changes = changes_for(spec, chosen)
    if changes is None:
        raise BughuntError(f"the hypothesis {chosen} leaves a config that cannot be read.")
    return spec.replace(**changes) if changes else spec
