"""The lint catalogue: every check's id, severity, explanation and fix (CHECKS), what a finding holds, and the
context the checks read a checkpoint through (loaded lazily and once)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from bughunt.spec import Spec, load_config, spec_from_config

SCHEMA_VERSION = 1
LINT_SCHEMA = "bughunt.lint"
SEVERITIES = ("error", "warning", "info")
# Families whose released tokenizers usually put BOS first. Only an assumption, used where the convention cannot be
# measured (bos_measure.py): a checkpoint of these families may well be trained without BOS (SmolLM2 is a llama).
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
    _c("pad-equals-eos", "info", "padding token is the end-of-sequence token",
       "Harmless for what bughunt runs (one unpadded sequence per row: no implementation masks by pad id) and for "
       "unbatched generation. It bites in two places: fine-tuning, where labels masked as `ids == pad_token_id` also "
       "hide every real EOS, so the model does not learn to stop; and batched generation or padded batches, where a "
       "mask built from ids cannot tell padding from end of text.",
       "Before fine-tuning or padded batching, give padding its own token (a <pad> or an unused reserved token) and "
       "set pad_token_id in config.json and pad_token in tokenizer_config.json to it."),
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
       "The installed transformers does not run the activation the config names (read from its own config object, "
       "not assumed): GemmaConfig rewrites hidden_act='gelu' to gelu_pytorch_tanh; Gemma2/Gemma3 configs ignore "
       "hidden_act and use hidden_activation (default gelu_pytorch_tanh); GemmaConfig ignores hidden_activation. An "
       "implementation that reads the field literally runs a different GELU.",
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
    _c("tokenizer-no-bos", "error", "tokenizer adds no BOS though the weights measurably need it",
       "Measured with the float64 reference (no library under test): the shipped text costs clearly more nats per "
       "token without BOS than with it, so the weights were trained with BOS first. Every text-based pipeline that "
       "follows this tokenizer feeds inputs unlike training and its outputs drift (the Gemma 'missing BOS' bug).",
       "Give tokenizer.json a post_processor that puts BOS first (transformers 5 follows it, not add_bos_token) "
       "and set add_bos_token: true in tokenizer_config.json for the sentencepiece paths."),
    _c("tokenizer-bos-unwanted", "error", "tokenizer adds BOS though the weights measurably do better without it",
       "Measured with the float64 reference (no library under test): the shipped text costs clearly more nats per "
       "token with the BOS the tokenizer prepends than without it, so the weights were trained without BOS (or with "
       "another first token). Every text-based pipeline that follows this tokenizer feeds an input unlike training.",
       "Remove BOS from tokenizer.json's post_processor and set add_bos_token: false in tokenizer_config.json, or "
       "set bos_token_id to the token the model was trained to see first."),
    _c("tokenizer-bos-unmeasured", "warning", "tokenizer adds no BOS; not measured, the family's usual convention assumed",
       "Whether the weights want BOS could not be measured (the reason is in the finding), and this family's "
       "released tokenizers usually put BOS first. If this checkpoint was trained that way, inputs without BOS "
       "drift; if it was trained without BOS (as SmolLM2 was), nothing is wrong.",
       "Check the model card or the training code for the BOS convention; if it is BOS first, make the tokenizer "
       "add it (tokenizer.json post_processor and add_bos_token)."),
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
    _c("chat-template-missing-bos", "warning", "the chat template path gives no BOS though the model wants it",
       "apply_chat_template(tokenize=True) encodes without special tokens, so unless the template writes "
       "{{ bos_token }} chat prompts reach the model without BOS. Fires when the measured loss says the weights want "
       "BOS first, or, where that cannot be measured, on the family's usual convention (the finding says which).",
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
        self.notes: dict[str, str] = {}  # check id -> what a check that passed measured or assumed (the table's note)

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
    def transformers_config(self):
        """transformers' reading of config.json (its config class, defaults and rewrites applied), or None when it refuses."""
        if self.transformers_config_error:
            return None
        import transformers

        return transformers.AutoConfig.from_pretrained(str(self.checkpoint))

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

    def bos_id(self) -> int | None:
        """config.json's bos_token_id, else the tokenizer's."""
        if self.spec.bos_token_id is not None:
            return self.spec.bos_token_id
        return self.tokenizer.bos_token_id

    @cached_property
    def bos_evidence(self):
        """The measured BOS convention (a bos_measure.BosMeasurement on weights that predict the text better than
        chance), or a sentence saying why it could not be measured. Raises _Skip when there is no tokenizer."""
        from bughunt.lint.bos_measure import measure_bos

        tok = self.tokenizer
        bos = self.bos_id()
        if bos is None:
            return "neither config.json nor the tokenizer names a BOS token"
        if not 0 <= bos < self.spec.vocab_size:
            return f"the BOS id {bos} is outside the embedding's {self.spec.vocab_size} rows"
        with np.errstate(all="ignore"):
            got = measure_bos(self.checkpoint, self.spec, tok, bos)
        if not isinstance(got, str) and not np.isfinite([got.loss_with_bos, got.loss_without_bos]).all():
            return "the forward pass gives non-finite losses (see weights-nonfinite)"
        if not isinstance(got, str) and not got.trained:
            return (f"the weights predict the shipped text no better than chance ({min(got.loss_with_bos, got.loss_without_bos):.2f} "
                    f"nats/token against {got.uniform_loss:.2f} for a uniform guess): they look untrained")
        return got

    def eos_ids(self) -> list[int]:
        eos = self.spec.eos_token_id
        return [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])


def _finding(check_id: str, message: str, **details: Any) -> Finding:
    c = CHECKS[check_id]
    return Finding(c.id, c.severity, message, c.explanation, c.fix, details)
