"""Tiny tokenizers for tiny checkpoints: a small BPE trained deterministically from the text shipped in
bughunt/data/, with exactly the model's vocab_size and the special tokens at the config's ids, saved as
Hugging Face tokenizer files that transformers.AutoTokenizer loads offline.

The pipeline per family copies the one transformers' tokenizer class for that family rebuilds in v5
(GemmaTokenizer: spaces -> "▁", no prefix space; LlamaTokenizer: Metaspace with a prefix space), so the
raw tokenizer.json and AutoTokenizer agree on a clean tiny checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bughunt.errors import BughuntError

DATA_DIR = Path(__file__).parent / "data"
CORPUS = DATA_DIR / "tiny_corpus.txt"


@dataclass(frozen=True)
class TokenizerStyle:
    """How one family's tokenizer looks: special-token strings, the transformers class, BOS handling."""

    tokenizer_class: str  # what tokenizer_config.json names; AutoTokenizer rebuilds its pipeline from it
    pipeline: str  # "gemma" (spaces -> "▁", no prefix) | "llama" (Metaspace, "▁" before the first word) | "qwen" (byte-level)
    bos: str
    eos: str
    pad: str
    unk: str | None
    add_bos: bool
    extra_special: tuple[str, ...] = ()
    chat_template: str | None = None


# Gemma's released template, shortened: the template writes BOS itself, because
# apply_chat_template(tokenize=True) encodes the rendered text with add_special_tokens=False.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# GemmaTokenizer's default mask_token "<mask>" gets an id past the vocabulary unless the vocab has it.
_GEMMA = TokenizerStyle("GemmaTokenizer", "gemma", "<bos>", "<eos>", "<pad>", "<unk>", True,
                        ("<mask>", "<start_of_turn>", "<end_of_turn>"), GEMMA_CHAT_TEMPLATE)
# transformers 5's LlamaTokenizer rebuilds BPE without an unk token, relying on <0xNN> byte tokens that a
# 256-entry vocab cannot hold, so it silently drops unknown characters. The tiny Llama-style tokenizer
# therefore names the generic TokenizersBackend (tokenizer.json loaded verbatim).
_LLAMA = TokenizerStyle("TokenizersBackend", "llama", "<s>", "</s>", "<pad>", "<unk>", True)
# Qwen adds no BOS. For model_type qwen2, AutoTokenizer ignores tokenizer_class and rebuilds a byte-level
# Qwen2Tokenizer, so the tiny Qwen tokenizer is byte-level with Qwen 2's pipeline (no unk token: characters
# outside the tiny alphabet are dropped, as in that pipeline).
_QWEN = TokenizerStyle("Qwen2Tokenizer", "qwen", "<|startoftext|>", "<|endoftext|>", "<|pad|>", None, False)

STYLES = {"gemma": _GEMMA, "gemma2": _GEMMA, "gemma3": _GEMMA, "llama": _LLAMA, "mistral": _LLAMA, "phi3": _LLAMA,
          "qwen2": _QWEN, "qwen3": _QWEN}


def _pipeline(tok, style: TokenizerStyle) -> None:
    """Set normalizer, pre-tokenizer and decoder as transformers' class for the family builds them."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    if style.pipeline == "qwen":
        from tokenizers import Regex
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
    elif style.pipeline == "gemma":
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])


def _train(vocab_size: int, n_special: int, style: TokenizerStyle, corpus: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Train BPE on the corpus; return (ordinary tokens in trainer order, merges). Training splits words at
    "▁" so no merge spans two words; the saved pipeline then gives the same pieces without splitting."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if style.pipeline == "qwen":
        tok = Tokenizer(models.BPE())
        _pipeline(tok, style)
        alphabet = []
    else:
        tok = Tokenizer(models.BPE(unk_token=style.unk, fuse_unk=True, byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if style.pipeline == "llama" else "never",
                                                     split=True)
        alphabet = ["▁"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_special, special_tokens=[], show_progress=False,
                                  initial_alphabet=alphabet, min_frequency=1)
    lines = corpus.read_text(encoding="utf-8").splitlines()
    tok.train_from_iterator(lines, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return tokens, merges


def write_tiny_tokenizer(out_dir: Path, vocab_size: int, bos_id: int | None, eos_id: int | list[int] | None,
                         pad_id: int | None, family: str, corpus: Path = CORPUS) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for a tiny model of `family`.

    Special tokens sit at the given ids; <unk> (and the family's extra specials) take the lowest free ids;
    trained tokens fill the rest, so the vocabulary has exactly `vocab_size` entries."""
    from tokenizers import AddedToken, Tokenizer, models, processors

    if family not in STYLES:
        raise BughuntError(f"no tiny tokenizer style for family '{family}'. Choose one of: {', '.join(STYLES)}.")
    style = STYLES[family]
    out_dir = Path(out_dir)
    if isinstance(eos_id, list):  # several stop ids: the first is the tokenizer's eos_token
        eos_id = eos_id[0] if eos_id else None
    placed: dict[int, str] = {}
    for name, tid in (("pad", pad_id), ("eos", eos_id), ("bos", bos_id)):
        if tid is None:
            continue
        if not 0 <= tid < vocab_size or tid in placed:
            raise BughuntError(f"tiny tokenizer: {name} id {tid} is outside the vocabulary (size {vocab_size}) or "
                               f"already used. Give distinct ids below vocab_size.")
        placed[tid] = getattr(style, name)
    free = (i for i in range(vocab_size) if i not in placed)
    for s in ((style.unk,) if style.unk else ()) + style.extra_special:
        placed[next(free)] = s
    tokens, merges = _train(vocab_size, len(placed), style, corpus)
    if len(tokens) != vocab_size - len(placed):
        hint = (f"the corpus alphabet alone needs more ids: use vocab_size >= {len(placed) + len(tokens)}"
                if len(tokens) > vocab_size - len(placed) else "use a larger corpus or a smaller vocab_size")
        raise BughuntError(f"tiny tokenizer: training on {corpus.name} gave {len(tokens)} tokens for "
                           f"{vocab_size - len(placed)} free ids; {hint}.")
    ordinary = iter(tokens)
    vocab = {placed[i] if i in placed else next(ordinary): i for i in range(vocab_size)}

    if style.pipeline == "qwen":
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False,
                                   continuing_subword_prefix="", end_of_word_suffix=""))
    else:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=style.unk, fuse_unk=True, byte_fallback=True))
    _pipeline(tok, style)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in placed.values()])
    if style.add_bos and bos_id is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{style.bos}:0 $A:0", pair=f"{style.bos}:0 $A:0 {style.bos}:1 $B:1",
            special_tokens=[(style.bos, bos_id)])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))

    # Roles the model lacks are written as null: Qwen2Tokenizer would otherwise default pad/unk to its EOS.
    specials = {"bos_token": style.bos if bos_id is not None else None, "eos_token": style.eos if eos_id is not None else None,
                "pad_token": style.pad if pad_id is not None else None, "unk_token": style.unk}
    config = {"tokenizer_class": style.tokenizer_class, **specials, "add_bos_token": style.add_bos and bos_id is not None,
              "add_eos_token": False, "model_max_length": 4096, "clean_up_tokenization_spaces": False}
    if "<mask>" in style.extra_special:
        config["mask_token"] = "<mask>"
    others = [t for t in style.extra_special if t != "<mask>"]
    if others:
        config["extra_special_tokens"] = others
    if style.chat_template:
        config["chat_template"] = style.chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({k: v for k, v in specials.items() if v is not None}, indent=1) + "\n")
    return out_dir
