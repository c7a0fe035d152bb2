"""Static checks of a checkpoint (config.json, weights, tokenizer) for the mistakes that make implementations
disagree before any forward pass runs: pad == eos, off-by-one sliding windows, activation fields a library
rewrites, untrained embedding rows, a tie flag that contradicts the stored weights, missing BOS, and so on.

    report = lint("path/to/checkpoint")
    print(format_table(report)); report.exit_code  # 0 clean or warnings only, 1 an error-severity check fired

Every check has an id, a severity, an explanation and a fix (CHECKS). The JSON document is versioned.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bughunt.spec import _ACTIVATIONS, Spec, load_config, spec_from_config

SCHEMA_VERSION = 1
LINT_SCHEMA = "bughunt.lint"
SEVERITIES = ("error", "warning", "info")
# Families whose released tokenizers put BOS first and whose models were trained that way.
EXPECTS_BOS = ("gemma", "gemma2", "gemma3", "llama", "mistral")
# A row whose L2 norm is below this fraction of the median row norm was almost certainly never trained.
UNTRAINED_ROW_RATIO = 1e-2
KNOWN_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")
# Fields each RoPE scaling type cannot work without (the papers / the official code that introduced them).
ROPE_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
                 "longrope": ("short_factor", "long_factor"),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
ROPE_EXTENDS_CONTEXT = ("dynamic", "yarn", "longrope", "llama3")
_CONFIG_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


@dataclass(frozen=True)
class Check:
    id: str
    severity: str  # error | warning | info
    title: str
    explanation: str
    fix: str


@dataclass
class Finding:
    check: str
    severity: str
    message: str  # what this checkpoint has, with the numbers
    explanation: str
    fix: str
    details: dict = field(default_factory=dict)


def _c(id: str, severity: str, title: str, explanation: str, fix: str) -> Check:
    return Check(id, severity, title, explanation, fix)


CHECKS: dict[str, Check] = {c.id: c for c in (
    _c("pad-equals-eos", "warning", "padding token is the end-of-sequence token",
       "When pad and EOS share an id, masks built as `ids != pad_token_id` also hide real EOS tokens: a fine-tuned "
       "model never sees EOS in its loss and does not learn to stop, and batched generation cannot tell padding "
       "from end of text.",
       "Give padding its own token (a <pad> or an unused reserved token) and set pad_token_id in config.json and "
       "pad_token in tokenizer_config.json to it."),
    _c("sliding-window-off-by-one", "warning", "sliding window one less than a round number",
       "Implementations disagree on whether the window counts the query itself (q - k < w or q - k <= w). A "
       "window of 2^n - 1 (or 999, 3999) usually means a value written for one convention and read by the other, "
       "which changes attention at the window edge on every long input.",
       "Check the window in the original implementation and its convention. bughunt reads sliding_window as the "
       "number of tokens a query sees, itself included; write that number (e.g. 4096, not 4095)."),
    _c("sliding-window-exceeds-context", "warning", "sliding window larger than max_position_embeddings",
       "A window larger than the longest sequence the model supports never takes effect, so sliding layers act as "
       "global ones. Usually a units mix-up or a field copied from another model.",
       "Set sliding_window to the value the model was trained with (at most max_position_embeddings), or null "
       "if no layer slides."),
    _c("max-position-rounded", "warning", "context length looks like a rounded decimal",
       "A context length such as 128000 or 32000 next to a power of two (131072, 32768) is usually a marketing "
       "figure written into the config. RoPE scaling types that compare positions with it (dynamic, yarn, "
       "longrope, llama3) then switch regimes at the wrong length.",
       "Write the exact trained length (e.g. 131072) in max_position_embeddings / original_max_position_embeddings."),
    _c("activation-fields-disagree", "error", "hidden_act and hidden_activation disagree",
       "The config carries both activation fields with different functions. transformers' Gemma reads hidden_act, "
       "Gemma 2/3 read hidden_activation, and other libraries pick either, so implementations run different "
       "MLPs from the same file.",
       "Keep one activation field (the one the family's config class defines) or make both name the same function."),
    _c("activation-silently-overridden", "warning", "a library rewrites or ignores the activation field",
       "transformers does not run the activation the config names: GemmaConfig rewrites hidden_act='gelu' to "
       "gelu_pytorch_tanh; Gemma2/Gemma3 configs ignore hidden_act and use hidden_activation (default "
       "gelu_pytorch_tanh); GemmaConfig ignores hidden_activation. An implementation that reads the field "
       "literally runs a different GELU.",
       "Write the activation the model was trained with explicitly in the field the family's config class reads "
       "(Gemma: hidden_act='gelu_pytorch_tanh'; Gemma 2/3: hidden_activation='gelu_pytorch_tanh')."),
    _c("untrained-embedding-rows", "warning", "untrained rows in the embedding or LM head",
       "Rows that are all zero or far smaller than the median row norm were never updated in training (reserved "
       "or added special tokens). Feeding those ids gives near-zero embeddings and meaningless logits; "
       "fine-tuning that uses them (e.g. as chat-turn markers) starts from nothing. The pad row is not counted.",
       "Avoid these ids in prompts and templates, or initialise their rows to the mean of the trained rows before "
       "fine-tuning."),
    _c("tied-but-lm-head-differs", "error", "tie_word_embeddings is true but a different lm_head is stored",
       "Implementations that honour the flag use the embedding as the output projection and drop the stored "
       "lm_head; implementations that load every tensor use it. Their logits differ.",
       "Set tie_word_embeddings to false if the stored lm_head is the trained one, or delete lm_head.weight."),
    _c("tied-but-lm-head-stored", "info", "tie_word_embeddings is true and an identical lm_head copy is stored",
       "The stored lm_head equals the embedding, so every implementation computes the same logits; the copy only "
       "costs disk and memory.",
       "Optionally drop lm_head.weight (save_pretrained does this for tied models)."),
    _c("untied-but-lm-head-missing", "error", "tie_word_embeddings is false but no lm_head is stored",
       "With the flag false the output projection is its own weight; since none is stored, transformers "
       "initialises it randomly (with only a log warning) while other implementations fail or tie it.",
       "Set tie_word_embeddings to true if the model ties its embeddings, or add the trained lm_head.weight."),
    _c("untied-but-lm-head-equals-embed", "warning", "tie_word_embeddings is false but lm_head equals the embedding",
       "The stored lm_head is a byte-identical copy of the embedding, which suggests a tied model saved with the "
       "wrong flag. Numerics agree now, but fine-tuning will untie them.",
       "Set tie_word_embeddings to true and drop lm_head.weight, unless the copy is intended."),
    _c("dtype-mismatch", "warning", "config dtype differs from the stored weights",
       "Loading with dtype='auto' casts the weights to the config's dtype, not the stored one: bf16 weights read "
       "as fp16 can overflow, fp32 weights read as bf16 lose precision. Implementations that ignore the field "
       "run at the stored dtype, so they differ.",
       "Set dtype (torch_dtype in older configs) in config.json to the stored dtype, or convert the weights."),
    _c("rope-unknown-type", "error", "unknown RoPE type",
       "The rope_type is not one transformers or bughunt knows; implementations fall back to default RoPE or "
       "fail, so long inputs differ.",
       f"Use one of {', '.join(KNOWN_ROPE_TYPES)} (legacy 'su' and 'type' keys mean longrope and rope_type)."),
    _c("rope-missing-field", "error", "RoPE scaling type lacks a field it needs",
       "Without the field an implementation either refuses the config (transformers 5 raises on load) or "
       "carries on with a default (factor 1, or a value derived from other fields; transformers 4 only logged "
       "a warning), so implementations run unscaled or differently scaled RoPE.",
       "Add the missing field (e.g. factor for linear/dynamic/yarn; low_freq_factor, high_freq_factor and "
       "original_max_position_embeddings for llama3; short_factor and long_factor for longrope)."),
    _c("rope-longrope-factor-length", "error", "longrope factor lists have the wrong length",
       "longrope scales each rotary frequency by its own factor, so short_factor and long_factor need "
       "rotary_dim / 2 entries. With another length transformers logs a warning and broadcasting fails or "
       "scales the wrong frequencies.",
       "Give short_factor and long_factor exactly head_dim * partial_rotary_factor / 2 entries each."),
    _c("rope-original-max-not-below-max", "warning", "original_max_position_embeddings is not below max_position_embeddings",
       "Context-extension RoPE (dynamic, yarn, longrope, llama3) only scales beyond the original length; when "
       "the original length is not smaller than max_position_embeddings the scaling never applies or the "
       "implied factor is <= 1.",
       "Set original_max_position_embeddings to the pre-extension training length and max_position_embeddings "
       "to the extended one."),
    _c("transformers-rejects-config", "error", "transformers refuses to load config.json",
       "transformers' config class raises on this config.json, so AutoModel and AutoTokenizer (which reads the "
       "config to pick its class) both fail, while implementations that parse the JSON themselves run it.",
       "Fix the field the message names; the rope and activation checks above usually point at it."),
    _c("tokenizer-unloadable", "error", "transformers cannot load the tokenizer",
       "AutoTokenizer fails on the tokenizer files, so every text-based pipeline fails or falls back to something "
       "else.",
       "Re-save the tokenizer with save_pretrained from a working copy; check tokenizer_class in tokenizer_config.json."),
    _c("tokenizer-no-bos", "error", "tokenizer does not add BOS though the model expects it",
       "This family was trained with BOS first in every sequence. Without it the first positions see an input "
       "unlike training and outputs drift (the Gemma 'missing BOS' bug).",
       "Give tokenizer.json a post_processor that puts BOS first (transformers 5 follows it, not add_bos_token) "
       "and set add_bos_token: true in tokenizer_config.json for the sentencepiece paths."),
    _c("add-bos-token-disagrees", "warning", "add_bos_token disagrees with tokenizer.json's post-processor",
       "tokenizer_config.json's add_bos_token says one thing and tokenizer.json's post_processor does the other. "
       "transformers 5 follows the post_processor when tokenizer.json exists; sentencepiece-based paths (slow "
       "tokenizers, keras-hub preprocessors) follow add_bos_token. The same text gets BOS in one and not the other.",
       "Make them agree: edit the post_processor in tokenizer.json or the add_bos_token flag."),
    _c("chat-template-double-bos", "error", "the chat template path gives two BOS tokens",
       "apply_chat_template(tokenize=True) produces BOS twice at the start: the template writes BOS more than "
       "once. The second BOS is an input the model never saw in training.",
       "Write {{ bos_token }} exactly once at the start of the chat template."),
    _c("chat-template-bos-retokenized", "warning", "rendered chat text gets a second BOS when tokenized",
       "The template writes BOS and the tokenizer also adds BOS by default, so the common pattern "
       "`tokenizer(tokenizer.apply_chat_template(..., tokenize=False))` starts with two BOS tokens.",
       "Tokenize rendered chat text with add_special_tokens=False, or use apply_chat_template(tokenize=True)."),
    _c("chat-template-missing-bos", "warning", "the chat template path gives no BOS though the model expects it",
       "apply_chat_template(tokenize=True) encodes without special tokens, so unless the template writes "
       "{{ bos_token }} chat prompts reach the model without BOS.",
       "Start the chat template with {{ bos_token }}."),
    _c("special-token-missing", "error", "a special-token id from config.json is not in the tokenizer vocabulary",
       "config.json names a bos/eos/pad id the tokenizer does not have, so generation stops on, or pads with, "
       "an id no text ever produces.",
       "Set the ids in config.json (and generation_config.json) to the tokenizer's special-token ids."),
    _c("special-token-mismatch", "error", "config.json and the tokenizer disagree on a special token",
       "The id config.json gives for bos/eos/pad maps to a different string than the tokenizer's own bos/eos/pad "
       "token, so the model and the tokenizer use different tokens for the same role (e.g. BOS added as one id "
       "while generation stops on another).",
       "Make config.json's bos_token_id/eos_token_id/pad_token_id the ids of the tokenizer's bos/eos/pad tokens."),
    _c("tokenizer-vocab-exceeds-model", "error", "the tokenizer has more tokens than the embedding has rows",
       "Ids at or above vocab_size index past the embedding matrix: an index error on one implementation, "
       "garbage or a silent clamp on another.",
       "Resize the embeddings (and lm_head) to the tokenizer length, or remove the extra added tokens."),
    _c("config-exceeds-weights", "error", "config.json describes a larger model than the weight files hold",
       "The sizes in config.json (vocab_size, hidden_size, intermediate_size, num_hidden_layers, heads) imply more "
       "parameters than the files store. Implementations that size the model from the config allocate far more "
       "memory than needed, then fail to load, or initialise the missing part randomly.",
       "Make config.json describe these weights: compare each size field with the stored shapes and the model card."),
    _c("weights-missing", "error", "tensors config.json implies are not stored",
       "Every implementation needs these tensors; transformers initialises missing ones randomly with only a log "
       "warning, others refuse the checkpoint.",
       "Add the missing tensors (export the checkpoint again) or fix config.json (e.g. num_hidden_layers, "
       "tie_word_embeddings, attention_bias)."),
    _c("weights-shape-mismatch", "error", "a stored tensor's shape contradicts config.json",
       "The config and the weights disagree on a size, so implementations either refuse to load or, where they "
       "reshape, compute with the wrong layout.",
       "Fix the size fields in config.json (hidden_size, heads, head_dim, intermediate_size, vocab_size) to match "
       "the weights."),
    _c("weights-unexpected", "error", "the weights hold tensors config.json does not describe",
       "No implementation reads them: layers beyond num_hidden_layers are silently dropped (the model you run is "
       "shallower than the one trained), and stray tensors (biases, extra heads) may be parameters the config "
       "forgot to switch on.",
       "Set num_hidden_layers (and attention_bias, mlp_bias, ...) to match the weights, or remove the stray tensors."),
    _c("weights-nonfinite", "error", "NaN or Inf values in the weights",
       "A single NaN in a weight spreads through every position that touches it: an embedding row poisons every "
       "prompt holding that token, a projection poisons every token. Implementations differ only in where they "
       "first show it.",
       "Restore the tensor from a good copy of the checkpoint (the training run's last finite state)."),
    _c("tokenizer-parity", "error", "tokenizer implementations disagree",
       "Two implementations turn the same text into different ids, so the same prompt feeds different inputs "
       "depending on which library tokenized it. (Run with --tokenizers; every disagreement is in "
       "tokenizer_parity.)",
       "Find the implementation that matches the one used in training; fix tokenizer.json / tokenizer_config.json "
       "(normalizer, pre-tokenizer, add_bos_token) so the others agree."),
)}


class _Skip(Exception):
    """A check cannot run on this checkpoint (e.g. no tokenizer files); the reason is recorded."""


class _Context:
    """Everything the checks read, loaded lazily and once."""

    def __init__(self, checkpoint: Path):
        self.checkpoint = Path(checkpoint)
        self.cfg = load_config(self.checkpoint)
        self.spec: Spec = spec_from_config(self.cfg, str(self.checkpoint / "config.json"))

    @cached_property
    def stored(self) -> dict[str, tuple[tuple[int, ...], str]]:
        from bughunt.checkpoint import stored_shapes

        return stored_shapes(self.checkpoint)

    def tensor(self, name: str) -> np.ndarray:
        """One tensor in its stored dtype, read from the shard that holds it."""
        from bughunt.checkpoint import weight_files
        from bughunt.safetensors_io import read_header, read_safetensors

        for f in weight_files(self.checkpoint):
            if name in read_header(f):
                return read_safetensors(f, {name})[name]
        raise _Skip(f"{name} is not stored")

    @cached_property
    def tokenizer_files(self) -> list[str]:
        return [n for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json") if (self.checkpoint / n).exists()]

    @cached_property
    def transformers_config_error(self) -> str | None:
        """Why transformers' AutoConfig refuses config.json, or None when it loads."""
        import transformers

        try:
            transformers.AutoConfig.from_pretrained(str(self.checkpoint))
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return None

    @cached_property
    def tokenizer(self):
        if not any(n in self.tokenizer_files for n in ("tokenizer.json", "tokenizer.model")):
            raise _Skip("no tokenizer files (tokenizer.json or tokenizer.model) in the checkpoint")
        if self.transformers_config_error:
            raise _Skip("transformers rejects config.json, which AutoTokenizer reads to pick the tokenizer class")
        import transformers

        try:
            return transformers.AutoTokenizer.from_pretrained(str(self.checkpoint))
        except Exception as e:
            raise _Skip(f"AutoTokenizer cannot load the tokenizer ({type(e).__name__}: {e})") from None

    def eos_ids(self) -> list[int]:
        eos = self.spec.eos_token_id
        return [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])


def _finding(check_id: str, message: str, **details: Any) -> Finding:
    c = CHECKS[check_id]
    return Finding(c.id, c.severity, message, c.explanation, c.fix, details)


# ---- config checks -----------------------------------------------------------------------------


def check_pad_equals_eos(ctx: _Context) -> list[Finding]:
    out = []
    pad, eos = ctx.spec.pad_token_id, ctx.eos_ids()
    if pad is not None and pad in eos:
        out.append(_finding("pad-equals-eos", f"config.json: pad_token_id={pad} is also an eos_token_id ({eos})",
                            source="config.json", pad_token_id=pad, eos_token_id=eos))
    if any(n in ctx.tokenizer_files for n in ("tokenizer.json", "tokenizer.model")):
        try:
            tok = ctx.tokenizer
        except _Skip:
            return out
        if tok.pad_token_id is not None and tok.pad_token_id == tok.eos_token_id and not out:
            out.append(_finding("pad-equals-eos", f"tokenizer: pad_token {tok.pad_token!r} is the eos_token (id {tok.pad_token_id})",
                                source="tokenizer", pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    return out


def _near_round(n: int) -> int | None:
    """The round number n is one less than (a power of two, or a multiple of 1000), if any."""
    m = n + 1
    if m >= 16 and (m & (m - 1) == 0 or m % 1000 == 0 or m % 1024 == 0):
        return m
    return None


def check_sliding_window(ctx: _Context) -> list[Finding]:
    w, maxpos = ctx.spec.sliding_window, ctx.spec.max_position_embeddings
    if w is None:
        raise _Skip("no layer uses a sliding window")
    out = []
    if (r := _near_round(w)) is not None:
        out.append(_finding("sliding-window-off-by-one", f"sliding_window is {w}, one less than {r}", sliding_window=w, round=r))
    if maxpos and w > maxpos:
        out.append(_finding("sliding-window-exceeds-context", f"sliding_window {w} > max_position_embeddings {maxpos}",
                            sliding_window=w, max_position_embeddings=maxpos))
    return out


def _rounded_decimal(n: int) -> int | None:
    """The power of two within 5% of n, when n is a multiple of 1000 (128000 -> 131072)."""
    if not isinstance(n, int) or n < 1000 or n % 1000:
        return None
    p = 2 ** round(math.log2(n))
    return p if p != n and abs(p - n) / p <= 0.05 else None


def _rope_param_sets(cfg: dict) -> list[tuple[str, dict]]:
    """Every RoPE parameter dict in the raw config, labelled by where it sits."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and any(isinstance(v, dict) for v in rp.values()):
        return [(f"rope_parameters.{k}", v) for k, v in rp.items() if isinstance(v, dict)]
    if isinstance(rp, dict):
        return [("rope_parameters", rp)]
    rs = cfg.get("rope_scaling")
    return [("rope_scaling", rs)] if isinstance(rs, dict) else []


def check_max_position(ctx: _Context) -> list[Finding]:
    out = []
    fields = [("max_position_embeddings", ctx.cfg.get("max_position_embeddings")),
              ("original_max_position_embeddings", ctx.cfg.get("original_max_position_embeddings"))]
    fields += [(f"{label}.original_max_position_embeddings", p.get("original_max_position_embeddings"))
               for label, p in _rope_param_sets(ctx.cfg)]
    for name, v in fields:
        if v is not None and (p := _rounded_decimal(v)) is not None:
            out.append(_finding("max-position-rounded", f"{name} is {v}; the nearby power of two is {p}", field=name, value=v, power_of_two=p))
    return out


def check_activation(ctx: _Context) -> list[Finding]:
    out = []
    fam = ctx.spec.family
    fields = {k: ctx.cfg[k] for k in ("hidden_act", "hidden_activation") if ctx.cfg.get(k)}
    canon = {k: _ACTIVATIONS.get(v, v) for k, v in fields.items()}
    if len(set(canon.values())) > 1:
        out.append(_finding("activation-fields-disagree", f"hidden_act={fields['hidden_act']!r} but hidden_activation={fields['hidden_activation']!r}",
                            **fields))
    hf_default = "gelu_pytorch_tanh"
    if fam == "gemma":
        if fields.get("hidden_act") == "gelu":
            out.append(_finding("activation-silently-overridden",
                                "hidden_act='gelu': transformers' GemmaConfig rewrites it to gelu_pytorch_tanh (tanh GELU); "
                                "a library reading it literally runs exact (erf) GELU",
                                field="hidden_act", written="gelu", transformers_runs=hf_default))
        elif "hidden_act" not in fields and "hidden_activation" in fields and canon["hidden_activation"] != "gelu_tanh":
            out.append(_finding("activation-silently-overridden",
                                f"hidden_activation={fields['hidden_activation']!r} is ignored by GemmaConfig, which reads "
                                f"hidden_act (default {hf_default})",
                                field="hidden_activation", written=fields["hidden_activation"], transformers_runs=hf_default))
    elif fam in ("gemma2", "gemma3") and "hidden_activation" not in fields and "hidden_act" in fields \
            and canon["hidden_act"] != "gelu_tanh":
        out.append(_finding("activation-silently-overridden",
                            f"hidden_act={fields['hidden_act']!r} is ignored by transformers' {fam} config, which reads "
                            f"hidden_activation (default {hf_default})",
                            field="hidden_act", written=fields["hidden_act"], transformers_runs=hf_default))
    return out


def check_rope(ctx: _Context) -> list[Finding]:
    out = []
    maxpos = ctx.cfg.get("max_position_embeddings")
    top_orig = ctx.cfg.get("original_max_position_embeddings")
    for label, p in _rope_param_sets(ctx.cfg):
        rtype = p.get("rope_type", p.get("type")) or "default"
        if rtype == "su":
            rtype = "longrope"  # legacy Phi-3 name
        if rtype not in KNOWN_ROPE_TYPES:
            out.append(_finding("rope-unknown-type", f"{label}: rope_type {rtype!r} is not a known RoPE type", where=label, rope_type=rtype))
            continue
        have = dict(p)
        if top_orig is not None:
            have.setdefault("original_max_position_embeddings", top_orig)
        missing = [k for k in ROPE_REQUIRED.get(rtype, ()) if have.get(k) is None]
        if missing:
            out.append(_finding("rope-missing-field", f"{label}: rope_type {rtype!r} needs {', '.join(missing)}, which is missing",
                                where=label, rope_type=rtype, missing=missing))
        if rtype == "longrope":
            partial = float(p.get("partial_rotary_factor", ctx.cfg.get("partial_rotary_factor", 1.0)) or 1.0)
            want = int(ctx.spec.head_dim * partial) // 2
            for k in ("short_factor", "long_factor"):
                v = p.get(k)
                if isinstance(v, list) and len(v) != want:
                    out.append(_finding("rope-longrope-factor-length",
                                        f"{label}.{k} has {len(v)} entries; rotary_dim/2 = {want}",
                                        where=f"{label}.{k}", length=len(v), expected=want))
        orig = have.get("original_max_position_embeddings")
        if rtype in ROPE_EXTENDS_CONTEXT and orig is not None and maxpos is not None and orig >= maxpos:
            out.append(_finding("rope-original-max-not-below-max",
                                f"{label}: rope_type {rtype!r} with original_max_position_embeddings {orig} >= max_position_embeddings {maxpos}",
                                where=label, original_max_position_embeddings=orig, max_position_embeddings=maxpos))
    return out


# ---- weight checks -----------------------------------------------------------------------------

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


# ---- tokenizer checks --------------------------------------------------------------------------


def check_transformers_config(ctx: _Context) -> list[Finding]:
    err = ctx.transformers_config_error
    if err:
        return [_finding("transformers-rejects-config", f"transformers.AutoConfig fails: {err[:300]}", error=err)]
    return []


def check_tokenizer_loads(ctx: _Context) -> list[Finding]:
    if not any(n in ctx.tokenizer_files for n in ("tokenizer.json", "tokenizer.model")):
        raise _Skip("no tokenizer files (tokenizer.json or tokenizer.model) in the checkpoint")
    if ctx.transformers_config_error:
        raise _Skip("transformers rejects config.json, which AutoTokenizer reads to pick the tokenizer class")
    try:
        ctx.tokenizer
    except _Skip as e:
        return [_finding("tokenizer-unloadable", str(e))]
    return []


def _bos_id(ctx: _Context, tok) -> int | None:
    return ctx.spec.bos_token_id if ctx.spec.bos_token_id is not None else tok.bos_token_id


def check_tokenizer_bos(ctx: _Context) -> list[Finding]:
    tok = ctx.tokenizer
    if ctx.spec.family not in EXPECTS_BOS:
        raise _Skip(f"{ctx.spec.family} models do not expect BOS")
    bos = _bos_id(ctx, tok)
    ids = list(tok("Hello world")["input_ids"])
    if bos is None or not ids or ids[0] != bos:
        return [_finding("tokenizer-no-bos", f"tokenizer('Hello world') gives {ids[:6]}, which does not start with BOS "
                                             f"(id {bos}); {ctx.spec.family} models expect it", ids=ids, bos_token_id=bos)]
    return []


def check_add_bos_flag(ctx: _Context) -> list[Finding]:
    path = ctx.checkpoint / "tokenizer.json"
    tcfg_path = ctx.checkpoint / "tokenizer_config.json"
    if not path.exists() or not tcfg_path.exists():
        raise _Skip("needs both tokenizer.json and tokenizer_config.json")
    try:
        flag = json.loads(tcfg_path.read_text(encoding="utf-8")).get("add_bos_token")
        from tokenizers import Tokenizer

        raw = Tokenizer.from_file(str(path))
    except Exception as e:
        raise _Skip(f"cannot read the tokenizer files ({type(e).__name__}: {e})") from None
    if flag is None:
        raise _Skip("tokenizer_config.json does not set add_bos_token")
    bos = ctx.spec.bos_token_id
    if bos is None:
        raise _Skip("config.json names no bos_token_id")
    ids = raw.encode("Hello world").ids
    adds = bool(ids) and ids[0] == bos
    if adds != bool(flag):
        return [_finding("add-bos-token-disagrees", f"tokenizer_config.json add_bos_token={flag} but tokenizer.json "
                                                    f"{'adds' if adds else 'does not add'} BOS: {ids[:6]}",
                         add_bos_token=flag, tokenizer_json_adds_bos=adds)]
    return []


def check_chat_template(ctx: _Context) -> list[Finding]:
    tok = ctx.tokenizer
    if not getattr(tok, "chat_template", None):
        raise _Skip("the tokenizer has no chat template")
    bos = _bos_id(ctx, tok)
    if bos is None:
        raise _Skip("neither config.json nor the tokenizer names a BOS token")
    messages = [{"role": "user", "content": "Hello"}]
    try:
        ids = list(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False))
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:
        raise _Skip(f"the chat template does not render a one-message conversation ({type(e).__name__}: {e})") from None
    lead = next((k for k, i in enumerate(ids) if i != bos), len(ids))
    out = []
    if lead >= 2:
        out.append(_finding("chat-template-double-bos", f"apply_chat_template(tokenize=True) starts with {lead} BOS tokens: {ids[:6]}",
                            ids=ids[:32], bos_token_id=bos))
    elif lead == 0 and ctx.spec.family in EXPECTS_BOS:
        out.append(_finding("chat-template-missing-bos", f"apply_chat_template(tokenize=True) gives {ids[:6]}, without BOS (id {bos})",
                            ids=ids[:32], bos_token_id=bos))
    if lead >= 1:
        retok = list(tok(text)["input_ids"])
        if len(retok) >= 2 and retok[0] == bos and retok[1] == bos:
            out.append(_finding("chat-template-bos-retokenized",
                                f"the rendered template starts with {tok.bos_token!r} and tokenizer(text) adds another: {retok[:6]}",
                                ids=retok[:32], bos_token_id=bos))
    return out


def check_special_tokens(ctx: _Context) -> list[Finding]:
    tok = ctx.tokenizer
    vocab = tok.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    out = []
    roles = [("bos", ctx.spec.bos_token_id, tok.bos_token, tok.bos_token_id),
             ("pad", ctx.spec.pad_token_id, tok.pad_token, tok.pad_token_id)]
    roles += [("eos", e, tok.eos_token, tok.eos_token_id) for e in ctx.eos_ids()]
    for role, cid, tstr, tid in roles:
        if cid is None:
            continue
        if cid not in by_id:
            out.append(_finding("special-token-missing", f"config.json {role}_token_id={cid} is not in the tokenizer vocabulary "
                                                         f"({len(by_id)} entries)", role=role, config_id=cid))
            continue
        if tstr is None or tid is None:
            continue
        if role == "eos":
            if tid not in ctx.eos_ids() and cid == ctx.eos_ids()[0]:
                out.append(_finding("special-token-mismatch", f"config.json eos_token_id {ctx.eos_ids()} does not include the "
                                                              f"tokenizer's eos_token {tstr!r} (id {tid})",
                                    role=role, config_id=ctx.eos_ids(), config_token=by_id[cid], tokenizer_token=tstr, tokenizer_id=tid))
        elif cid != tid:
            out.append(_finding("special-token-mismatch", f"config.json {role}_token_id={cid} is {by_id[cid]!r}, but the tokenizer's "
                                                          f"{role}_token is {tstr!r} (id {tid})",
                                role=role, config_id=cid, config_token=by_id[cid], tokenizer_token=tstr, tokenizer_id=tid))
    return out


def check_tokenizer_size(ctx: _Context) -> list[Finding]:
    tok = ctx.tokenizer
    n, v = len(tok), ctx.spec.vocab_size
    if n > v:
        extra = sorted(i for i in tok.get_vocab().values() if i >= v)
        return [_finding("tokenizer-vocab-exceeds-model", f"the tokenizer has {n} tokens but vocab_size is {v}; ids "
                                                          f"{extra[:10]} have no embedding row", tokenizer_size=n, vocab_size=v,
                         ids_past_vocab=extra[:100])]
    return []


# (function, ids it can fire): the order of the table.
RULES: list[tuple[Callable[[_Context], list[Finding]], tuple[str, ...]]] = [
    (check_pad_equals_eos, ("pad-equals-eos",)),
    (check_sliding_window, ("sliding-window-off-by-one", "sliding-window-exceeds-context")),
    (check_max_position, ("max-position-rounded",)),
    (check_activation, ("activation-fields-disagree", "activation-silently-overridden")),
    (check_rope, ("rope-unknown-type", "rope-missing-field", "rope-longrope-factor-length", "rope-original-max-not-below-max")),
    (check_dtype, ("dtype-mismatch",)),
    (check_weights_against_config, ("config-exceeds-weights", "weights-missing", "weights-shape-mismatch", "weights-unexpected")),
    (check_nonfinite_weights, ("weights-nonfinite",)),
    (check_untrained_rows, ("untrained-embedding-rows",)),
    (check_tied_embeddings, ("tied-but-lm-head-differs", "tied-but-lm-head-stored", "untied-but-lm-head-missing",
                             "untied-but-lm-head-equals-embed")),
    (check_transformers_config, ("transformers-rejects-config",)),
    (check_tokenizer_loads, ("tokenizer-unloadable",)),
    (check_tokenizer_bos, ("tokenizer-no-bos",)),
    (check_add_bos_flag, ("add-bos-token-disagrees",)),
    (check_chat_template, ("chat-template-double-bos", "chat-template-bos-retokenized", "chat-template-missing-bos")),
    (check_special_tokens, ("special-token-missing", "special-token-mismatch")),
    (check_tokenizer_size, ("tokenizer-vocab-exceeds-model",)),
]


@dataclass
class LintReport:
    checkpoint: str
    family: str
    checks: list[dict]  # id, severity, title, status (passed | fired | skipped), reason
    findings: list[Finding]
    tokenizer_parity: dict | None = None
    versions: dict = field(default_factory=dict)

    def count(self, severity: str) -> int:
        return sum(f.severity == severity for f in self.findings)

    @property
    def exit_code(self) -> int:
        return 1 if self.count("error") else 0

    def to_dict(self) -> dict:
        return {"schema": LINT_SCHEMA, "version": SCHEMA_VERSION, "checkpoint": self.checkpoint, "family": self.family,
                "versions": self.versions, "summary": {s: self.count(s) for s in SEVERITIES} | {"exit_code": self.exit_code},
                "checks": self.checks, "findings": [asdict(f) for f in self.findings],
                "tokenizer_parity": self.tokenizer_parity}

    def write_json(self, path: Path, protect=()) -> None:
        """Write the document atomically; an existing file is replaced only if it is an earlier lint document."""
        from bughunt.output import write_output_file

        write_output_file(path, json.dumps(self.to_dict(), indent=1, ensure_ascii=False, default=_json_default) + "\n",
                          LINT_SCHEMA, protect)

    def fired(self) -> set[str]:
        return {f.check for f in self.findings}


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def lint(checkpoint: Path, tokenizers: bool = False) -> LintReport:
    """Run every check on a checkpoint. Bad input (no config.json, an unreadable config) raises BughuntError;
    a check that cannot apply (no tokenizer, no sliding window) is recorded as skipped with its reason."""
    import tokenizers as _tk
    import transformers

    import bughunt

    ctx = _Context(Path(checkpoint))
    findings: list[Finding] = []
    checks: list[dict] = []
    for rule, ids in RULES:
        try:
            got = rule(ctx)
            reason = None
        except _Skip as e:
            got, reason = [], str(e)
        findings += got
        fired = {f.check for f in got}
        for cid in ids:
            c = CHECKS[cid]
            status = "skipped" if reason else ("fired" if cid in fired else "passed")
            checks.append({"id": cid, "severity": c.severity, "title": c.title, "status": status, "reason": reason})
    parity = None
    if tokenizers:
        from bughunt.tokenizer_parity import tokenizer_parity

        report = tokenizer_parity(ctx.checkpoint)
        parity = report.to_dict()
        c = CHECKS["tokenizer-parity"]
        if len(report.implementations) < 2:
            status, reason = "skipped", "fewer than two tokenizer implementations could run: " + \
                "; ".join(f"{s['name']}: {s['reason']}" for s in report.skipped)
        else:
            status, reason = ("fired" if report.disagreements else "passed"), None
            if report.disagreements:
                names = sorted({d["name"] for d in report.disagreements})
                pairs = sorted({f"{d['reference']} vs {d['candidate']}" for d in report.disagreements})
                findings.append(_finding("tokenizer-parity", f"{'; '.join(pairs)} disagree on {len(names)} of {report.strings} "
                                                             f"strings: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}",
                                         strings=names, bos_differs=any(d.get("bos_differs") for d in report.disagreements)))
        checks.append({"id": c.id, "severity": c.severity, "title": c.title, "status": status, "reason": reason})
    versions = {"bughunt": bughunt.__version__, "transformers": transformers.__version__, "tokenizers": _tk.__version__}
    return LintReport(str(ctx.checkpoint), ctx.spec.family, checks, findings, parity, versions)


def format_table(report: LintReport) -> str:
    """The terminal table: every check with its status, then each finding with its fix."""
    lines = [f"lint · {report.family} · {report.checkpoint} · {report.count('error')} error(s), "
             f"{report.count('warning')} warning(s), {report.count('info')} info"]
    lines.append(f"  {'check':<34} {'severity':<8} {'status':<8} note")
    for c in report.checks:
        note = c["reason"] or ""
        lines.append(f"  {c['id']:<34} {c['severity']:<8} {c['status']:<8} {note[:80]}")
    for f in report.findings:
        lines.append(f"  {f.severity.upper()} [{f.check}] {f.message}")
        lines.append(f"      fix: {f.fix}")
    return "\n".join(lines)


def html_section(report: LintReport) -> str:
    """An HTML fragment (findings, then every check) for the report's extra_sections."""
    e = html.escape
    parts = [f"<p>{e(report.family)} · <code>{e(report.checkpoint)}</code> · {report.count('error')} error(s), "
             f"{report.count('warning')} warning(s), {report.count('info')} info</p>"]
    if report.findings:
        parts.append("<table><tr><th>severity</th><th>check</th><th>finding</th><th>why it matters</th><th>fix</th></tr>")
        for f in report.findings:
            parts.append(f"<tr class=\"{e(f.severity)}\"><td>{e(f.severity)}</td><td><code>{e(f.check)}</code></td>"
                         f"<td>{e(f.message)}</td><td>{e(f.explanation)}</td><td>{e(f.fix)}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p>No check fired.</p>")
    parts.append("<details><summary>all checks</summary><table><tr><th>check</th><th>severity</th><th>status</th><th>note</th></tr>")
    for c in report.checks:
        parts.append(f"<tr><td><code>{e(c['id'])}</code></td><td>{e(c['severity'])}</td><td>{e(c['status'])}</td>"
                     f"<td>{e(c['reason'] or '')}</td></tr>")
    parts.append("</table></details>")
    if report.tokenizer_parity and report.tokenizer_parity["disagreements"]:
        parts.append("<h3>tokenizer disagreements</h3><table><tr><th>string</th><th>text</th><th>reference ids</th><th>candidate ids</th></tr>")
        for d in report.tokenizer_parity["disagreements"][:50]:
            parts.append(f"<tr><td>{e(d['name'])} ({e(d['reference'])} vs {e(d['candidate'])})</td><td><code>{e(repr(d['text'])[:80])}</code></td>"
                         f"<td><code>{e(str(d['reference_ids'])[:120])}</code></td><td><code>{e(str(d['candidate_ids'])[:120])}</code></td></tr>")
        parts.append("</table>")
    return "\n".join(parts)


def extra_section(report: LintReport) -> dict:
    """The entry to append to result.data['extra_sections'] so report.html shows the lint results."""
    return {"title": "Checkpoint lint", "html": html_section(report)}
