"""The toggle registry: named numerics choices with finite values. The registry says what each means and
what each family's config or paper implies; each implementation says how (and whether) it applies it.
Names describe the choice, not a verdict."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from bughunt.errors import BughuntError
from reference_impls._numerics import POLICY_CHOICES, Policy
from bughunt.spec import Rope, Spec


@dataclass(frozen=True)
class Toggle:
    name: str
    description: str
    kind: str  # "choice" (fixed values), "int", "float" (a value; "off" allowed where stated)
    values: tuple[str, ...] = ()
    allow_off: bool = False
    default: Callable[[Spec], str] = lambda spec: ""  # what the family's config/paper implies, as a string
    suggestions: Callable[[Spec], tuple[str, ...]] = lambda spec: ()  # values worth trying in a search
    applies: Callable[[Spec], bool] = lambda spec: True  # whether the toggle means anything for this family
    setting: bool = False  # a runtime setting of a library (its K/V cache type), not a choice the reference models

    def parse(self, raw: str, spec: Spec | None = None) -> str:
        """Validate a value and return its canonical string."""
        raw = str(raw).strip()
        if self.kind == "choice":
            if raw not in self.values:
                raise BughuntError(f"toggle {self.name}={raw!r}: allowed values are {', '.join(self.values)}.")
            return raw
        if self.allow_off and raw == "off":
            return "off"
        try:
            if self.kind == "int":
                v = int(raw)
                if v <= 0:
                    raise ValueError
                return str(v)
            if raw.startswith("rsqrt:"):
                v = float(raw[6:])
                if v <= 0:
                    raise ValueError
                return raw
            v = float(raw)
            if not math.isfinite(v) or v <= 0:
                raise ValueError
            return repr(v)
        except ValueError:
            hint = "a positive integer" if self.kind == "int" else "a positive number" + (" or rsqrt:N" if self.name == "query_scale" else "")
            raise BughuntError(f"toggle {self.name}={raw!r}: expected {hint}{' or off' if self.allow_off else ''}.") from None


def _num(value: str) -> float:
    return float(value[6:]) ** -0.5 if value.startswith("rsqrt:") else float(value)


def _fmt(v: float) -> str:
    return repr(float(v))


def _gelu_default(spec: Spec) -> str:
    return spec.activation.removeprefix("gelu_") if spec.activation.startswith("gelu") else ""


def _norm_default(spec: Spec) -> str:
    return "fp32" if spec.norm_form == "one_plus_w" else "mixed"


def _policy(name: str, description: str, **kw) -> Toggle:
    """A toggle that is a field of the reference's Policy: its values (and the values a search tries) are the Policy's
    table (reference_impls._numerics.POLICY_CHOICES), its default the Policy field's default unless given."""
    values = POLICY_CHOICES[name]
    field_default = next(f.default for f in dataclasses.fields(Policy) if f.name == name)
    kw.setdefault("default", lambda s: field_default)
    return Toggle(name, description, "choice", values, suggestions=lambda s: values, **kw)


TOGGLES: dict[str, Toggle] = {t.name: t for t in [
    _policy("gelu", "GELU form in the MLP: exact (erf) or the tanh approximation", default=_gelu_default,
            applies=lambda s: s.activation.startswith("gelu")),
    _policy("rope_dtype", "RoPE inverse frequencies and positions in fp32, or in the model dtype (a buffer cast by model.to(bf16))"),
    _policy("rope_pairing", "which features RoPE rotates together: half (x[i], x[i+d/2]) or interleaved (x[2i], x[2i+1])"),
    _policy("norm_dtype", "RMSNorm precision: fp32 (normalise and scale, incl. Gemma's (1+w), in fp32), mixed (normalise in fp32, "
            "scale in the model dtype), model (all in the model dtype)", default=_norm_default),
    _policy("embed_scale_dtype", "the sqrt(hidden) embedding scale kept in fp32 or rounded to the model dtype first",
           applies=lambda s: s.embed_scale is not None),
    Toggle("bos", "prepend BOS to the input ids (on) or strip it (off)", "choice", ("on", "off"),
           default=lambda s: "on", suggestions=lambda s: ("on", "off"), applies=lambda s: s.bos_token_id is not None),
    Toggle("sliding_window", "sliding-window size override: a query sees itself and window-1 earlier tokens", "int",
           default=lambda s: str(s.sliding_window) if s.sliding_window else "",
           suggestions=lambda s: tuple(str(w) for w in (s.sliding_window - 1, s.sliding_window, s.sliding_window + 1)) if s.sliding_window else (),
           applies=lambda s: s.sliding_window is not None),
    Toggle("attn_softcap", "attention logit soft-cap: cap * tanh(scores / cap), or off", "float", allow_off=True,
           default=lambda s: _fmt(s.attn_softcap) if s.attn_softcap else "off",
           suggestions=lambda s: ("off", _fmt(s.attn_softcap)) if s.attn_softcap else ("off",)),
    Toggle("final_softcap", "final logit soft-cap, or off", "float", allow_off=True,
           default=lambda s: _fmt(s.final_softcap) if s.final_softcap else "off",
           suggestions=lambda s: ("off", _fmt(s.final_softcap)) if s.final_softcap else ("off",)),
    Toggle("query_scale", "multiplier on q.k scores; rsqrt:N means N^-0.5 (head_dim, hidden/heads or query_pre_attn_scalar)", "float",
           default=lambda s: _fmt(s.query_scale),
           suggestions=lambda s: tuple(dict.fromkeys([_fmt(s.query_scale), f"rsqrt:{s.head_dim}", f"rsqrt:{s.hidden_size // s.num_heads}"]))),
    Toggle("rope_theta", "RoPE base (theta) for every layer", "float", default=lambda s: _fmt(s.rope["full"].theta),
           suggestions=lambda s: tuple(dict.fromkeys([_fmt(s.rope["full"].theta), "10000.0", "500000.0", "1000000.0"]))),
    Toggle("rms_eps", "RMSNorm epsilon", "float", default=lambda s: _fmt(s.rms_eps),
           suggestions=lambda s: tuple(dict.fromkeys([_fmt(s.rms_eps), "1e-06", "1e-05"]))),
    _policy("rope_positions", "RoPE positions alone in the model dtype (bf16 rounds 257 to 256, 8191 to 8192) or kept exact"),
    _policy("longrope_switch", "the first input length that uses longrope's long factors: orig, orig+1 (length > "
            "original_max_position_embeddings, Phi-3's code) or orig+2 (one token late)",
            applies=lambda s: any(r.type == "longrope" for r in s.rope.values())),
    Toggle("rope_theta_source", "RoPE theta read from the config, or a hard-coded 10000 (a port that ignores the field)",
           "choice", ("config", "default"), default=lambda s: "config", suggestions=lambda s: ("config", "default"),
           applies=lambda s: any(r.theta != 10000.0 for r in s.rope.values())),
    # Storage and precision: where an implementation keeps or computes values at a lower precision than the run's dtype.
    _policy("weights_dtype", "weights as loaded: the checkpoint's values at the model dtype (model), or rounded to fp16 or bf16 "
            "first (a converter that casts on load)"),
    _policy("kv_dtype", "K (after RoPE) and V as a KV cache holds them: in the model dtype (model), or rounded to fp16, bf16 or "
            "fp8 (e4m3)"),
    _policy("attn_dtype", "attention scores and softmax: mixed (scores in the model dtype, softmax in fp32: HF eager), fp32 "
            "(both in fp32, probabilities rounded to the model dtype: fused kernels), model (both in the model dtype)"),
    _policy("logits_dtype", "output logits (and their soft-cap) in the model dtype (model) or in fp32 from the final norm's output"),
    _policy("matmul_inputs", "both operands of every linear layer (projections, MLP, output embedding) as the model dtype has "
            "them (model), or rounded first to tf32, bf16 or fp16 (TF32 matmuls, autocast)"),
    # Runtime settings of implementations that keep a K/V cache in the captured pass (llamacpp). The defaults are what
    # such a library gives a user who sets nothing; no search tries them (they are settings, not hypotheses).
    Toggle("kv_cache", "type the K and V cache stores keys and values in (llama.cpp's default is f16)", "choice",
           ("f16", "f32", "bf16", "q8_0"), default=lambda s: "f16", setting=True),
    Toggle("flash_attn", "flash attention: auto (llama.cpp decides, its default), on or off", "choice", ("auto", "on", "off"),
           default=lambda s: "auto", setting=True),
]}

# Toggles that are Policy fields of the reference (the rest change the Spec or the input ids): its table names them.
POLICY_TOGGLES = tuple(POLICY_CHOICES)


_FIELD_CACHE: dict[str, dict[str, Toggle]] = {}  # config.json text -> its field toggles (a search asks many times)


def field_toggles(spec: Spec) -> dict[str, Toggle]:
    """The ignored-field hypotheses of this spec's config (bughunt/hypotheses.py) as toggles `field:<path>`, each with
    the value `config` (read as given) and one value per hypothesis."""
    import json

    from bughunt import hypotheses as hy

    if spec.source is None:
        return {}
    key = json.dumps(spec.source, sort_keys=True, default=str)
    if key not in _FIELD_CACHE:
        if len(_FIELD_CACHE) > 32:
            _FIELD_CACHE.clear()
        found: dict[str, list] = {}
        for h in hy.hypotheses(spec):
            found.setdefault(h.toggle, []).append(h)
        out = {}
        for name, hs in found.items():
            values = (hy.CONFIG,) + tuple(h.value for h in hs)
            out[name] = Toggle(name, f"{name[len(hy.PREFIX):]} read as config.json gives it (config), or: " +
                               "; ".join(f"{h.value}: {h.description}" for h in hs), "choice", values,
                               default=lambda s: hy.CONFIG, suggestions=lambda s, v=values: v)
        _FIELD_CACHE[key] = out
    return _FIELD_CACHE[key]


def is_field(name: str) -> bool:
    from bughunt.hypotheses import PREFIX

    return name.startswith(PREFIX)


def lookup(name: str, spec: Spec | None) -> Toggle | None:
    """The toggle called `name` for this spec: a registered one, or an ignored-field hypothesis of its config."""
    if name in TOGGLES:
        return TOGGLES[name]
    if spec is not None and is_field(name):
        return field_toggles(spec).get(name)
    return None


def available(spec: Spec) -> dict[str, Toggle]:
    """Every toggle that means something for this spec: the registered ones that apply, then its field hypotheses."""
    return {**{n: t for n, t in TOGGLES.items() if t.applies(spec)}, **field_toggles(spec)}


def describe_setting(spec: Spec, toggles: dict[str, str]) -> list[str]:
    """One phrase per toggle for a report: an ignored-field hypothesis says what it means ("as if it ignored
    query_pre_attn_scalar (query_scale 0.2041 -> 0.25)"); a registered toggle says name=value."""
    from bughunt import hypotheses as hy

    out = []
    for name, value in toggles.items():
        if is_field(name):
            h = next((h for h in hy.hypotheses(spec) if h.toggle == name and h.value == value), None)
            out.append(h.description if h else f"{name}={value}")
        else:
            out.append(f"{name}={value}")
    return out


def parse_toggles(items: list[str] | dict[str, Any] | None, spec: Spec | None = None) -> dict[str, str]:
    """['gelu=tanh', 'sliding_window=2047'] or {'gelu': 'tanh'} -> canonical {name: value}."""
    if not items:
        return {}
    pairs = items.items() if isinstance(items, dict) else [_split(i) for i in items]
    out: dict[str, str] = {}
    for name, value in pairs:
        toggle = lookup(name, spec)
        if toggle is None and is_field(name) and spec is None:
            out[name] = str(value).strip()  # checked against the checkpoint's config once it is known
            continue
        if toggle is None:
            raise BughuntError(_unknown(name, spec))
        out[name] = toggle.parse(value, spec)
    return out


def _unknown(name: str, spec: Spec | None) -> str:
    if is_field(name):
        fields = ", ".join(field_toggles(spec)) if spec is not None else ""
        return (f"unknown toggle '{name}': ignoring or replacing that config field changes nothing the forward pass reads for "
                f"this checkpoint, or the config has no such field. Field hypotheses here: {fields or 'none'}.")
    return f"unknown toggle '{name}'. Known toggles: {', '.join(TOGGLES)}, and field:<config field> hypotheses."


def _split(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not value:
        raise BughuntError(f"toggle '{item}' must be NAME=VALUE, e.g. gelu=tanh or sliding_window=2047.")
    return name.strip(), value.strip()


def defaults(spec: Spec) -> dict[str, str]:
    """What each toggle's value is when nothing is toggled, for this spec (only toggles that apply)."""
    return {name: t.default(spec) for name, t in available(spec).items()}


def changed(spec: Spec, toggles: dict[str, str]) -> dict[str, str]:
    """The subset of toggles whose value differs from the spec's default."""
    base = defaults(spec)
    return {k: v for k, v in toggles.items() if base.get(k, "config" if is_field(k) else None) != v}


def apply_to_spec(spec: Spec, toggles: dict[str, str]) -> Spec:
    """Toggles that are config values, applied to a Spec (used by the reference)."""
    from bughunt import hypotheses as hy

    fields = {k[len(hy.PREFIX):]: v for k, v in toggles.items() if is_field(k) and v != hy.CONFIG}
    if fields:  # first what the implementation reads from the config, then the explicit overrides below
        spec = hy.apply(spec, fields)
    changes: dict[str, Any] = {}
    for name, value in toggles.items():
        if name == "sliding_window":
            changes["sliding_window"] = int(value)
        elif name in ("attn_softcap", "final_softcap"):
            changes[name] = None if value == "off" else float(value)
        elif name == "query_scale":
            changes["query_scale"] = _num(value)
        elif name == "rms_eps":
            changes["rms_eps"] = float(value)
        elif name == "rope_theta":
            changes["rope"] = {k: dataclasses.replace(r, theta=float(value)) for k, r in spec.rope.items()}
        elif name == "rope_theta_source" and value == "default":
            changes["rope"] = {k: dataclasses.replace(r, theta=10000.0) for k, r in spec.rope.items()}
    return spec.replace(**changes) if changes else spec


def apply_to_tokens(tokens, spec: Spec, toggles: dict[str, str]):
    """The bos toggle: prepend BOS to each row that lacks it (on) or strip a leading BOS (off)."""
    import numpy as np

    value = toggles.get("bos")
    if value is None or spec.bos_token_id is None:
        return tokens
    bos = spec.bos_token_id
    has = bool((tokens[:, 0] == bos).all())
    if value == "on" and not has:
        return np.concatenate([np.full((tokens.shape[0], 1), bos, dtype=tokens.dtype), tokens], axis=1)
    if value == "off" and has and tokens.shape[1] > 1:
        return tokens[:, 1:]
    return tokens


__all__ = ["TOGGLES", "POLICY_TOGGLES", "Toggle", "parse_toggles", "defaults", "changed", "apply_to_spec", "apply_to_tokens",
            "available", "lookup", "field_toggles", "describe_setting", "Rope"]
