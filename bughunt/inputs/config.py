"""config.json: the types and ranges of every field the Spec reads, checked with pydantic before any of them is
used, so a string where a number belongs or a layer count of 10^12 is refused at once with the field named.
Also the `--decode-config KEY=VALUE` overrides, which must name an existing config field and keep its type."""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bughunt.errors import BughuntError
from bughunt.inputs.files import found, validation_message

# Upper bounds far above any released model (the largest have ~130 layers, hidden 16k-25k, vocab 256k), low enough
# that nothing sized by them (per-layer tables, expected weight names) can exhaust memory.
MAX_LAYERS = 10_000
MAX_HIDDEN = 1 << 20
MAX_INTERMEDIATE = 1 << 22
MAX_HEADS = 1 << 14
MAX_VOCAB = 1 << 32
MAX_POSITIONS = 1 << 40
MAX_TOKEN_ID = (1 << 63) - 1

FIX = "Fix the field in config.json (compare it with the model card or the original config)."

Count = Annotated[int, Field(strict=True, ge=1)]
TokenId = Annotated[int, Field(strict=True, ge=0, le=MAX_TOKEN_ID)]
Positive = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(strict=True, gt=0, le=1, allow_inf_nan=False)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Flag = Annotated[bool, Field(strict=True)]
Text = Annotated[str, Field(strict=True)]


class _Open(BaseModel):
    """Fields bughunt does not read are allowed and kept; the ones it reads must have the right type."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())


class RopeParameters(_Open):
    rope_theta: Positive | None = None
    rope_type: Text | None = None
    type: Text | None = None
    factor: Positive | None = None
    partial_rotary_factor: Fraction | None = None
    original_max_position_embeddings: Annotated[int, Field(strict=True, ge=1, le=MAX_POSITIONS)] | None = None
    low_freq_factor: Positive | None = None
    high_freq_factor: Positive | None = None
    attention_factor: Positive | None = None
    beta_fast: Number | None = None
    beta_slow: Number | None = None
    short_factor: list[Number] | None = None
    long_factor: list[Number] | None = None
    # transformers 5 per-layer-type form: {"full_attention": {...}, "sliding_attention": {...}}
    full_attention: RopeParameters | None = None
    sliding_attention: RopeParameters | None = None


class ConfigFile(_Open):
    """The fields of a Hugging Face config.json that bughunt reads. Required fields are checked by the Spec reader,
    which names the missing one; here they are optional so that message stays the same."""

    model_type: Text | None = None
    vocab_size: Annotated[int, Field(strict=True, ge=1, le=MAX_VOCAB)] | None = None
    hidden_size: Annotated[int, Field(strict=True, ge=1, le=MAX_HIDDEN)] | None = None
    intermediate_size: Annotated[int, Field(strict=True, ge=1, le=MAX_INTERMEDIATE)] | None = None
    num_hidden_layers: Annotated[int, Field(strict=True, ge=1, le=MAX_LAYERS)] | None = None
    num_attention_heads: Annotated[int, Field(strict=True, ge=1, le=MAX_HEADS)] | None = None
    num_key_value_heads: Annotated[int, Field(strict=True, ge=1, le=MAX_HEADS)] | None = None
    head_dim: Annotated[int, Field(strict=True, ge=1, le=MAX_HIDDEN)] | None = None
    hidden_act: Text | None = None
    hidden_activation: Text | None = None
    rms_norm_eps: Positive | None = None
    max_position_embeddings: Annotated[int, Field(strict=True, ge=0, le=MAX_POSITIONS)] | None = None
    original_max_position_embeddings: Annotated[int, Field(strict=True, ge=1, le=MAX_POSITIONS)] | None = None
    layer_types: list[Literal["full_attention", "sliding_attention"]] | None = None
    sliding_window: Annotated[int, Field(strict=True, ge=1, le=MAX_POSITIONS)] | None = None
    sliding_window_pattern: Annotated[int, Field(strict=True, ge=1, le=MAX_LAYERS)] | None = None
    use_sliding_window: Flag | None = None
    rope_theta: Positive | None = None
    rope_local_base_freq: Positive | None = None
    rope_scaling: RopeParameters | None = None
    rope_parameters: RopeParameters | None = None
    partial_rotary_factor: Fraction | None = None
    query_pre_attn_scalar: Positive | None = None
    attn_logit_softcapping: Positive | None = None
    final_logit_softcapping: Positive | None = None
    attention_bias: Flag | None = None
    tie_word_embeddings: Flag | None = None
    bos_token_id: TokenId | None = None
    eos_token_id: TokenId | list[TokenId] | None = None
    pad_token_id: TokenId | None = None
    dtype: Text | None = None
    torch_dtype: Text | None = None

    @model_validator(mode="after")
    def _head_dim_is_positive(self) -> "ConfigFile":
        if self.head_dim is None and self.hidden_size and self.num_attention_heads and self.hidden_size < self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is smaller than num_attention_heads {self.num_attention_heads}, "
                             "so the derived head_dim (hidden_size // num_attention_heads) is 0; give head_dim explicitly")
        return self


def validate_config(cfg: Any, source: str) -> dict:
    """Check config.json's fields; return the dict unchanged, or raise one BughuntError naming each bad field."""
    if not isinstance(cfg, dict):
        raise BughuntError(f"{source} must hold a JSON object ({{\"model_type\": ..., ...}}), found {found(cfg)}. {FIX}")
    try:
        ConfigFile.model_validate(cfg)
    except ValidationError as e:
        raise BughuntError(validation_message(e, source, FIX)) from None
    except RecursionError:
        raise BughuntError(f"{source}: rope_parameters nests too deeply. {FIX}") from None
    return cfg


def validate_decode_config(changes: dict[str, Any], cfg: dict, source: str) -> dict[str, Any]:
    """`--decode-config KEY=VALUE` overrides: each KEY must be a field of config.json holding a number, a string or a
    boolean (or null), and VALUE must have the same type (an integer for an integer field). Returns them converted."""
    out: dict[str, Any] = {}
    for key, value in changes.items():
        flag = f"--decode-config {key}={value}"
        if key not in cfg:
            close = difflib.get_close_matches(key, list(cfg), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise BughuntError(f"{flag}: '{key}' is not a field of {source}.{hint} A decode-config changes an existing "
                               "config value for the one-token steps, e.g. --decode-config sliding_window=4095.")
        current = cfg[key]
        if isinstance(current, bool):
            if str(value).lower() not in ("true", "false"):
                raise BughuntError(f"{flag}: {key} is a boolean in {source}; give true or false, found {found(value)}.")
            out[key] = str(value).lower() == "true"
        elif isinstance(current, int) or (current is None and isinstance(value, int)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise BughuntError(f"{flag}: {key} is an integer in {source} ({current!r}); give an integer, found {found(value)}.")
            out[key] = value
        elif isinstance(current, float) or current is None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
                what = "a number" if current is not None else "null (a number when set)"
                raise BughuntError(f"{flag}: {key} is {what} in {source}; give a finite number, found {found(value)}.")
            out[key] = float(value) if isinstance(current, float) else value
        elif isinstance(current, str):
            out[key] = str(value)
        else:
            raise BughuntError(f"{flag}: {key} holds {found(current)} in {source}; only numbers, strings and booleans can be "
                               "changed from the command line.")
    return out
