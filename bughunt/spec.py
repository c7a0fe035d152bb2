"""The Spec: a framework-neutral reading of a checkpoint's config.json with every numerics-relevant
field, resolved across families and across config schema versions (transformers 4.x vs 5.x)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bughunt.errors import BughuntError
from bughunt.inputs.config import validate_config
from bughunt.inputs.files import read_json

# model_type in config.json -> family name used everywhere in bughunt.
FAMILIES = {
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "llama": "llama",
    "mistral": "mistral",
    "phi3": "phi3",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
}

# Canonical activation names: gelu_tanh (tanh approximation), gelu_exact (erf), silu.
_ACTIVATIONS = {
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu_exact",
    "gelu_exact": "gelu_exact",
    "silu": "silu",
    "swish": "silu",
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


@dataclass(frozen=True)
class Rope:
    """RoPE parameters for one kind of layer."""

    theta: float
    type: str = "default"  # default | linear | dynamic | yarn | llama3 | longrope
    factor: float = 1.0  # linear/dynamic/yarn scaling factor
    partial_rotary_factor: float = 1.0  # fraction of head_dim that is rotated (phi3, some others)
    extra: dict[str, Any] = field(default_factory=dict)  # other scaling fields, kept verbatim


@dataclass(frozen=True)
class Spec:
    family: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    activation: str  # gelu_tanh | gelu_exact | silu, as the family's reference implementation reads it
    rms_eps: float
    max_position_embeddings: int
    layer_types: tuple[str, ...]  # "full" | "sliding" per layer
    sliding_window: int | None  # tokens a query may see, itself included (q - k < window)
    rope: dict[str, Rope]  # layer type ("full"/"sliding") -> Rope
    attn_softcap: float | None
    final_softcap: float | None
    query_scale: float  # multiplier applied to q.k scores
    embed_scale: float | None  # multiplier on the embedding output (Gemma: sqrt(hidden))
    norm_form: str  # "one_plus_w" (Gemma: x * (1 + w)) | "w" (Llama: x * w)
    sandwich_norms: bool  # Gemma 2/3: post-attention and post-feedforward norms on the branches
    qk_norm: bool  # Gemma 3, Qwen 3: RMSNorm on q and k per head
    attention_bias: bool  # Qwen 2: biases on q, k, v
    tie_word_embeddings: bool
    fused_qkv: bool  # Phi-3: one qkv_proj weight
    fused_gate_up: bool  # Phi-3: one gate_up_proj weight
    original_max_position_embeddings: int | None
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    pad_token_id: int | None
    config_dtype: str | None
    notes: tuple[str, ...] = ()  # how ambiguous or legacy fields were resolved
    # the config.json this spec was read from (validated), kept so that bughunt/hypotheses.py can ask what the spec
    # would be had an implementation ignored one of its fields; not part of the spec's value or its JSON form
    source: dict | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        d["layer_types"] = list(self.layer_types)
        d["notes"] = list(self.notes)
        return d

    def replace(self, **changes: Any) -> "Spec":
        return dataclasses.replace(self, **changes)


def load_config(checkpoint: Path) -> dict:
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise BughuntError(f"checkpoint directory {checkpoint} does not exist. Pass the path of a Hugging Face-format directory (config.json + *.safetensors).")
    if not checkpoint.is_dir():
        raise BughuntError(f"{checkpoint} is a file, not a checkpoint directory. Pass the directory that holds config.json and the *.safetensors files.")
    path = checkpoint / "config.json"
    if not os.path.lexists(path):
        raise BughuntError(f"{checkpoint} has no config.json. A checkpoint is a Hugging Face-format directory; save it with save_pretrained().")
    cfg = read_json(path, "config", "Fix the file, or save the checkpoint again with save_pretrained().")
    return validate_config(cfg, str(path))


def _req(cfg: dict, key: str, kind: type, path: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise BughuntError(f"{path}: required field '{key}' is missing. Add it to config.json.")
    v = cfg[key]
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise BughuntError(f"{path}: field '{key}' must be an integer, found {v!r}.")
    if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise BughuntError(f"{path}: field '{key}' must be a number, found {v!r}.")
    if kind in (int, float) and v <= 0:
        raise BughuntError(f"{path}: field '{key}' must be positive, found {v!r}.")
    return v


def _rope_from(params: dict, default_theta: float | None, path: str, partial: float) -> Rope:
    theta = params.get("rope_theta", default_theta)
    if theta is None:
        raise BughuntError(f"{path}: no rope_theta found (neither rope_parameters.rope_theta nor rope_theta). Add it to config.json.")
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    factor = float(params.get("factor", 1.0) or 1.0)
    partial = float(params.get("partial_rotary_factor", partial) or partial)
    extra = {k: v for k, v in params.items() if k not in ("rope_theta", "rope_type", "type", "factor", "partial_rotary_factor")}
    return Rope(theta=float(theta), type=str(rtype), factor=factor, partial_rotary_factor=partial, extra=extra)


def spec_from_config(cfg: dict, path: str = "config.json") -> Spec:
    """Read a config dict into a Spec, resolving per-family defaults and legacy fields. Each reader below takes one
    concern (sizes, activation, attention layout, RoPE, scaling and soft-caps, layout flags, special ids) and appends
    to `notes` how it resolved an ambiguous or legacy field."""
    validate_config(cfg, path)
    model_type, family = _family(cfg, path)
    notes: list[str] = []
    sizes = _sizes(cfg, path)
    activation = _activation(cfg, family, path, notes)
    layer_types, window = _layer_types(cfg, family, sizes["num_layers"], path, notes)
    rope = _rope(cfg, family, path, notes)
    return Spec(
        family=family,
        model_type=model_type,
        **sizes,
        activation=activation,
        rms_eps=float(cfg.get("rms_norm_eps", 1e-5 if family == "phi3" else 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 0),
        layer_types=layer_types,
        sliding_window=window,
        rope=rope,
        **_scaling_and_softcaps(cfg, family, sizes["head_dim"]),
        **_layout(cfg, family, sizes["hidden_size"]),
        original_max_position_embeddings=cfg.get("original_max_position_embeddings"),
        **_special_ids(cfg),
        config_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
        notes=tuple(notes),
        source=cfg,
    )


def _family(cfg: dict, path: str) -> tuple[str, str]:
    """config.json's model_type and the bughunt family it names."""
    model_type = cfg.get("model_type")
    if model_type is None:
        raise BughuntError(f"{path}: no 'model_type' field, so the architecture is unknown. Add e.g. \"model_type\": \"llama\".")
    if model_type not in FAMILIES:
        raise BughuntError(
            f"{path}: model_type '{model_type}' is not supported. Supported: {', '.join(sorted(FAMILIES))}."
        )
    return model_type, FAMILIES[model_type]


def _sizes(cfg: dict, path: str) -> dict[str, int]:
    """The Spec's size fields: required ones checked, kv heads and head_dim derived when the config leaves them out."""
    hidden = _req(cfg, "hidden_size", int, path)
    heads = _req(cfg, "num_attention_heads", int, path)
    layers = _req(cfg, "num_hidden_layers", int, path)
    vocab = _req(cfg, "vocab_size", int, path)
    inter = _req(cfg, "intermediate_size", int, path)
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    if heads % kv:
        raise BughuntError(f"{path}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}. Fix the config.")
    return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers, num_heads=heads,
                num_kv_heads=kv, head_dim=head_dim)


def _activation(cfg: dict, family: str, path: str, notes: list[str]) -> str:
    """The MLP activation: Gemma 2/3 configs carry hidden_activation; Gemma 1 and others hidden_act."""
    act_fields = {k: cfg[k] for k in ("hidden_activation", "hidden_act") if cfg.get(k)}
    if family in ("gemma2", "gemma3") and "hidden_activation" in act_fields:
        raw_act, act_field = act_fields["hidden_activation"], "hidden_activation"
    elif "hidden_act" in act_fields:
        raw_act, act_field = act_fields["hidden_act"], "hidden_act"
    elif "hidden_activation" in act_fields:
        raw_act, act_field = act_fields["hidden_activation"], "hidden_activation"
    else:
        raw_act, act_field = ("gelu_pytorch_tanh" if family.startswith("gemma") else "silu"), "default"
        notes.append(f"no activation field; using the family default {raw_act}")
    if raw_act not in _ACTIVATIONS:
        raise BughuntError(f"{path}: activation '{raw_act}' ({act_field}) is not supported. Supported: {', '.join(sorted(_ACTIVATIONS))}.")
    activation = _ACTIVATIONS[raw_act]
    if family == "gemma" and raw_act == "gelu":
        # Gemma's official code uses the tanh approximation; the first released configs said "gelu".
        activation = "gelu_tanh"
        notes.append("gemma config says hidden_act='gelu' (legacy value); the Gemma paper/official code use the tanh approximation, so the spec reads gelu_tanh")
    if len(set(act_fields.values())) > 1:
        notes.append(f"activation fields disagree: {act_fields}; using {act_field}")
    return activation


def _layer_types(cfg: dict, family: str, layers: int, path: str, notes: list[str]) -> tuple[tuple[str, ...], int | None]:
    """Which layers use a sliding window ("sliding"/"full" per layer), and the window itself (None: no layer slides)."""
    window = cfg.get("sliding_window")
    if family == "qwen2" or family == "qwen3":
        if not cfg.get("use_sliding_window", False):
            window = None
    raw_types = cfg.get("layer_types")
    if raw_types is not None:
        if len(raw_types) != layers:
            raise BughuntError(f"{path}: layer_types has {len(raw_types)} entries but num_hidden_layers is {layers}. Fix the config.")
        types = tuple("sliding" if t == "sliding_attention" else "full" for t in raw_types)
    elif family == "gemma2":
        types = tuple("sliding" if i % 2 == 0 else "full" for i in range(layers))
        notes.append("no layer_types: Gemma 2 alternates sliding (even layers) and full attention")
    elif family == "gemma3":
        pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6
        types = tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(layers))
        notes.append(f"no layer_types: Gemma 3 uses a full-attention layer every {pattern} layers")
    else:
        types = tuple("sliding" if window else "full" for _ in range(layers))
    if window is None:
        types = tuple("full" for _ in types)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise BughuntError(f"{path}: sliding_window must be a positive integer or null, found {window!r}.")
    return types, window


def _rope(cfg: dict, family: str, path: str, notes: list[str]) -> dict[str, Rope]:
    """RoPE per layer type ("full"/"sliding"): transformers 5 writes rope_parameters (possibly per layer type); 4.x
    wrote rope_theta + rope_scaling."""
    partial = float(cfg.get("partial_rotary_factor", 1.0) or 1.0)
    rp = cfg.get("rope_parameters")
    # Without a rope_theta anywhere, transformers uses the architecture's default_theta (Gemma 3: 1M global, 10k local).
    default_theta = {"full": 1_000_000.0 if family == "gemma3" else 10000.0, "sliding": 10000.0}
    if not isinstance(rp, dict):
        return _rope_legacy(cfg, family, path, partial, notes)
    for params, kind in [(rp.get("full_attention"), "full"), (rp.get("sliding_attention"), "sliding"), (rp, "full")]:
        if isinstance(params, dict) and "rope_theta" not in params and cfg.get("rope_theta") is None and \
                (params is not rp or not any(k in rp for k in ("full_attention", "sliding_attention"))):
            notes.append(f"no rope_theta for {kind} layers; using the {family} default {default_theta[kind]:g}, as transformers does")
    if "full_attention" not in rp and "sliding_attention" not in rp:
        whole = _rope_from(rp, cfg.get("rope_theta", default_theta["full"]), path, partial)
        return {"full": whole, "sliding": whole}
    rope: dict[str, Rope] = {}
    for key, kind in (("full_attention", "full"), ("sliding_attention", "sliding")):
        if key in rp:
            rope[kind] = _rope_from(rp[key], cfg.get("rope_theta", default_theta[kind]), path, partial)
    rope.setdefault("full", rope.get("sliding"))
    rope.setdefault("sliding", rope["full"])
    return rope


def _rope_legacy(cfg: dict, family: str, path: str, partial: float, notes: list[str]) -> dict[str, Rope]:
    """RoPE as transformers 4.x wrote it: rope_theta and rope_scaling; Gemma 3's sliding layers use
    rope_local_base_freq."""
    base = dict(cfg.get("rope_scaling") or {})
    base.setdefault("rope_theta", cfg.get("rope_theta", 10000.0 if family != "gemma3" else 1_000_000.0))
    full = _rope_from(base, None, path, partial)
    if family != "gemma3":
        return {"full": full, "sliding": full}
    local = cfg.get("rope_local_base_freq")
    local = 10000.0 if local is None else local  # null reads as not given: transformers' Gemma 3 default
    sliding = Rope(theta=float(local), partial_rotary_factor=partial)
    notes.append(f"Gemma 3 sliding layers use rope_local_base_freq={local}")
    return {"full": full, "sliding": sliding}


def _scaling_and_softcaps(cfg: dict, family: str, head_dim: int) -> dict[str, float | None]:
    """The query scale (Gemma 2/3: query_pre_attn_scalar^-0.5, others head_dim^-0.5) and the Gemma 2/3 soft-caps on
    attention scores and final logits."""
    qpas = cfg.get("query_pre_attn_scalar")
    if family in ("gemma2", "gemma3") and qpas:
        query_scale = float(qpas) ** -0.5
    else:
        query_scale = head_dim ** -0.5
    attn_softcap = cfg.get("attn_logit_softcapping") if family in ("gemma2", "gemma3") else None
    final_softcap = cfg.get("final_logit_softcapping") if family in ("gemma2", "gemma3") else None
    return dict(query_scale=query_scale, attn_softcap=float(attn_softcap) if attn_softcap else None,
                final_softcap=float(final_softcap) if final_softcap else None)


def _layout(cfg: dict, family: str, hidden: int) -> dict[str, Any]:
    """How the family lays out its layers and embeddings: Gemma's scaled embedding and (1 + w) norms, sandwich norms,
    QK-norm, q/k/v biases, tied embeddings, Phi-3's fused projections."""
    gemma = family.startswith("gemma")
    return dict(
        embed_scale=math.sqrt(hidden) if gemma else None,
        norm_form="one_plus_w" if gemma else "w",
        sandwich_norms=family in ("gemma2", "gemma3"),
        qk_norm=family in ("gemma3", "qwen3"),
        attention_bias=bool(cfg.get("attention_bias", family == "qwen2")),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
        fused_qkv=family == "phi3",
        fused_gate_up=family == "phi3",
    )


def _special_ids(cfg: dict) -> dict[str, Any]:
    """The BOS, EOS (one id or a list) and PAD token ids, as the config gives them."""
    return dict(bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"), pad_token_id=cfg.get("pad_token_id"))


def rope_problems(spec: Spec) -> list[str]:
    """What in the spec's RoPE no implementation could compute (transformers refuses these too): longrope factor lists
    of the wrong length or missing, dynamic scaling without a positive max_position_embeddings. `lint` reports the same
    as findings; the reference refuses such a spec, and the search drops a field hypothesis that leads to one."""
    problems = []
    for kind, r in spec.rope.items():
        half = int(spec.head_dim * r.partial_rotary_factor) // 2
        if r.type == "longrope":
            for name in ("short_factor", "long_factor"):
                got = r.extra.get(name)
                if not isinstance(got, list) or len(got) != half:
                    problems.append(f"rope_type longrope ({kind} layers) needs {name}, a list of {half} numbers (one per rotated "
                                    f"pair: head_dim x partial_rotary_factor / 2), found {got!r}")
        if r.type == "dynamic" and not spec.max_position_embeddings > 0:
            problems.append(f"rope_type dynamic ({kind} layers) scales by the input length over max_position_embeddings, which "
                            f"must be a positive integer; found {spec.max_position_embeddings!r}")
    return list(dict.fromkeys(problems))


def load_spec(checkpoint: Path) -> Spec:
    cfg = load_config(checkpoint)
    return spec_from_config(cfg, str(Path(checkpoint) / "config.json"))
