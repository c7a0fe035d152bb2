"""Text in: turn prompts, prompt files or a chat file into the token ids every implementation is fed, through the
checkpoint's own tokenizer (transformers' AutoTokenizer on the checkpoint's tokenizer files), once, with BOS exactly
as that tokenizer's configuration adds it. The result records the text, the ids, the tokenizer and the BOS rule.

Several prompts are several rows of one batch. No implementation is fed a padding mask, so rows must have the same
number of ids: every row is cut to the shortest prompt's length, and each cut is recorded (`cut_from`) and reported.
A chat file is one row: the messages rendered through the tokenizer's chat template and tokenized as
`apply_chat_template` does (special tokens only where the template writes them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bughunt.errors import BughuntError
from bughunt.findings import Finding
from bughunt.inputs.text import check_prompt, read_chat_file, read_prompt_file

DEFAULT_TEXT_FILE = Path(__file__).parent / "data" / "default_prompt.txt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class TextRequest:
    """What the user asked for: prompts (one row each, in the order given) or one chat, never both.

    `sources` names where each prompt came from (`--prompt`, `--prompt-file F`, a ci key, `default text`).
    `default` marks the shipped default text, which falls back to seeded ids on a checkpoint without a tokenizer."""

    prompts: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    chat: tuple[dict, ...] | None = None
    chat_source: str | None = None
    default: bool = False

    def __post_init__(self) -> None:
        if bool(self.prompts) == (self.chat is not None):
            raise BughuntError("give either prompts (--prompt, --prompt-file) or one chat file (--chat), not both.")

    @property
    def kind(self) -> str:
        return "chat" if self.chat is not None else "default text" if self.default else "prompt"


def default_request() -> TextRequest:
    """The short text shipped with the package (bughunt/data/default_prompt.txt)."""
    return TextRequest(prompts=(read_prompt_file(DEFAULT_TEXT_FILE),), sources=("default text",), default=True)


def request(prompts: list[tuple[str, str]] | None = None, chat: str | Path | None = None) -> TextRequest | None:
    """A TextRequest from the command line's text options, read and validated here at the edge.

    `prompts` is a list of ("prompt", TEXT) or ("prompt-file", PATH) in the order given; None when no text was given."""
    prompts = prompts or []
    if prompts and chat is not None:
        raise BughuntError("give either --prompt/--prompt-file or --chat, not both: a chat is one row of its own.")
    if chat is not None:
        return TextRequest(chat=tuple(read_chat_file(Path(chat))), chat_source=f"--chat {chat}")
    if not prompts:
        return None
    texts, sources = [], []
    for i, (kind, value) in enumerate(prompts):
        if kind == "prompt-file":
            texts.append(read_prompt_file(Path(value)))
            sources.append(f"--prompt-file {value}")
        else:
            where = "--prompt" if len(prompts) == 1 else f"--prompt (number {i + 1})"
            texts.append(check_prompt(value, where))
            sources.append("--prompt")
    return TextRequest(prompts=tuple(texts), sources=tuple(sources))


TEXT_KEYS = ("prompt", "prompt_file", "chat")


def request_from_table(table: dict, where: str, base_dir: Path) -> TextRequest | None:
    """A TextRequest from a ci matrix's tokens table: prompt = "..." or ["...", ...], prompt_file = "f.txt" or a list
    (paths relative to the matrix file), chat = "chat.json". None when the table holds none of these keys."""
    given = [k for k in TEXT_KEYS if k in table]
    if not given:
        return None
    if "chat" in given and len(given) > 1:
        raise BughuntError(f"{where}: give either prompt/prompt_file or chat, not both: a chat is one row of its own.")

    def strings(key: str) -> list[str]:
        v = table[key]
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
            raise BughuntError(f"{where}.{key} must be a string or a non-empty list of strings, e.g. {key} = \"...\"; found {v!r}.")
        return items

    def path(value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else base_dir / p

    if "chat" in given:
        (chat,) = strings("chat") if isinstance(table["chat"], str) else (None,)
        if chat is None:
            raise BughuntError(f"{where}.chat must be one path (a string), e.g. chat = \"chat.json\"; found {table['chat']!r}.")
        return TextRequest(chat=tuple(read_chat_file(path(chat), f"{where}.chat")), chat_source=f"{where}.chat {chat}")
    texts, sources = [], []
    for i, value in enumerate(strings("prompt") if "prompt" in table else []):
        texts.append(check_prompt(value, f"{where}.prompt" + (f"[{i}]" if not isinstance(table["prompt"], str) else "")))
        sources.append(f"{where}.prompt")
    for value in strings("prompt_file") if "prompt_file" in table else []:
        texts.append(read_prompt_file(path(value), f"{where}.prompt_file"))
        sources.append(f"{where}.prompt_file {value}")
    return TextRequest(prompts=tuple(texts), sources=tuple(sources))


@dataclass
class EncodedText:
    """The ids the text became, and how: the tokenizer, its BOS rule, and any row that was cut."""

    tokens: np.ndarray  # [rows, seq] int64
    kind: str  # "prompt" | "chat" | "default text"
    rows: list[dict]  # per row: source, text (as tokenized: the rendered template for a chat), ids before any cut
    tokenizer: str
    bos: str  # the rule, in words
    bos_token_id: int | None
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict:
        """What result.json's inputs.text holds."""
        return {"kind": self.kind, "tokenizer": self.tokenizer, "bos": self.bos, "bos_token_id": self.bos_token_id,
                "rows": self.rows, "notes": self.notes}


def has_tokenizer(checkpoint: Path) -> bool:
    return any((Path(checkpoint) / name).exists() for name in TOKENIZER_FILES)


def load_tokenizer(checkpoint: Path, why: str):
    """transformers' AutoTokenizer on the checkpoint's own files, offline; a checkpoint without them is refused."""
    checkpoint = Path(checkpoint)
    if not has_tokenizer(checkpoint):
        raise BughuntError(f"{checkpoint} has no tokenizer files ({', '.join(TOKENIZER_FILES)}), so {why} cannot be turned "
                           "into token ids. Add the checkpoint's tokenizer files, or give the ids with --tokens / --tokens-file.")
    import transformers

    try:  # a local directory: local_files_only, without setting HF_HUB_OFFLINE for the rest of the process (hub ids)
        return transformers.AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    except Exception as e:  # a broken tokenizer is the user's file, not a crash of bughunt
        raise BughuntError(f"{checkpoint}: transformers' AutoTokenizer cannot load the tokenizer files "
                           f"({type(e).__name__}: {str(e)[:300]}). Fix the tokenizer files, or give ids with --tokens.") from None


def describe_tokenizer(tok) -> str:
    import transformers

    return f"transformers {transformers.__version__} AutoTokenizer ({type(tok).__name__})"


def _ids(encoding) -> list[int]:
    ids = encoding["input_ids"] if not isinstance(encoding, list) else encoding
    return [int(i) for i in ids]


def special_affixes(tok, text: str) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after the text's own ids when asked for its special tokens."""
    full, plain = _ids(tok(text)), _ids(tok(text, add_special_tokens=False))
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return full, []  # the special tokens change the body: report all of it as added


def _bos_rule(tok, affixes: list[tuple[list[int], list[int]]], spec_bos: int | None) -> tuple[str, list[str]]:
    bos = tok.bos_token_id
    notes = []
    if spec_bos is not None and bos is not None and bos != spec_bos:
        notes.append(f"the tokenizer's BOS id {bos} differs from config.json's bos_token_id {spec_bos}")
    prefixes = {tuple(p) for p, _ in affixes}
    suffixes = {tuple(s) for _, s in affixes}
    prefix, suffix = (list(next(iter(prefixes))), list(next(iter(suffixes)))) if len(prefixes) == len(suffixes) == 1 else (None, None)
    if prefix is None:
        return "the tokenizer adds different special tokens to different prompts (see each row's ids)", notes
    if not prefix:
        rule = "no BOS: the tokenizer adds none before the text"
        if spec_bos is not None:
            rule += f" (config.json names bos_token_id {spec_bos}, which the tokenizer does not prepend)"
    elif prefix == [bos]:
        rule = f"BOS {tok.bos_token!r} (id {bos}) prepended by the tokenizer"
    else:
        rule = f"the tokenizer prepends ids {prefix}"
        if prefix.count(bos) > 1:
            notes.append(f"the tokenizer adds BOS {prefix.count(bos)} times")
    if suffix:
        rule += f"; appends ids {suffix}"
    return rule, notes


def encode_text(checkpoint: str | Path, text: TextRequest, spec=None) -> EncodedText:
    """Tokenize a TextRequest with the checkpoint's tokenizer: the ids every implementation is fed.

    Refuses (BughuntError) a checkpoint without tokenizer files, a chat on a tokenizer without a chat template, a
    template that rejects the messages, and ids longer than the model's positions (`spec.max_position_embeddings`)."""
    checkpoint = Path(checkpoint)
    if spec is None:
        from bughunt.spec import load_spec

        spec = load_spec(checkpoint)
    what = {"chat": "the chat file", "prompt": "the prompt", "default text": "the default text"}[text.kind]
    tok = load_tokenizer(checkpoint, what)
    notes: list[str] = []
    if text.chat is not None:
        if not getattr(tok, "chat_template", None):
            raise BughuntError(f"{text.chat_source}: the tokenizer of {checkpoint} has no chat template (chat_template in "
                               "tokenizer_config.json, or chat_template.jinja), so the messages cannot be rendered. "
                               "Give the text with --prompt instead, or add the model's chat template.")
        messages = [dict(m) for m in text.chat]
        generation = messages[-1]["role"] != "assistant"  # a chat ending on the user's turn asks for the model's answer
        try:
            rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
            ids = _ids(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation, return_dict=True))
        except Exception as e:  # the template's own message (e.g. roles must alternate) says what to fix
            raise BughuntError(f"{text.chat_source}: the checkpoint's chat template rejects these messages "
                               f"({type(e).__name__}: {str(e)[:300]}). Fix the messages to fit the template.") from None
        bos = tok.bos_token_id
        starts = next((k for k, t in enumerate(ids) if t != bos), len(ids)) if bos is not None else 0
        rule = (f"BOS as the chat template writes it ({starts} x {tok.bos_token!r} at the start); the rendered text is "
                "tokenized without adding special tokens, as apply_chat_template does")
        if starts > 1:
            notes.append(f"the chat template and tokenizer give {starts} BOS tokens at the start")
        rows = [{"source": text.chat_source, "text": rendered, "messages": messages, "add_generation_prompt": generation,
                 "ids": ids}]
    else:
        rows, affixes = [], []
        for prompt, source in zip(text.prompts, text.sources):
            ids = _ids(tok(prompt))
            affixes.append(special_affixes(tok, prompt))
            rows.append({"source": source, "text": prompt, "ids": ids})
        rule, more = _bos_rule(tok, affixes, spec.bos_token_id)
        notes += more
    positions = spec.max_position_embeddings
    for i, row in enumerate(rows):
        if not row["ids"]:
            raise BughuntError(f"{row['source']}: the tokenizer turns the text into no ids at all. Give text the tokenizer knows.")
        if positions and len(row["ids"]) > positions:
            raise BughuntError(f"{row['source']}: the text is {len(row['ids'])} tokens, longer than the model's "
                               f"{positions} positions (max_position_embeddings in config.json). Shorten the text to at most "
                               f"{positions} tokens.")
    length = min(len(r["ids"]) for r in rows)
    for i, row in enumerate(rows):
        if len(row["ids"]) > length:
            row["cut_from"] = len(row["ids"])
            notes.append(f"row {i} ({row['source']}) cut from {len(row['ids'])} to {length} tokens: the rows of a batch have "
                         "the same length, and no implementation is fed a padding mask")
    tokens = np.asarray([r["ids"][:length] for r in rows], dtype=np.int64)
    return EncodedText(tokens=tokens, kind=text.kind, rows=rows, tokenizer=describe_tokenizer(tok), bos=rule,
                       bos_token_id=tok.bos_token_id, notes=notes)


def resolve_input(checkpoint: str | Path, spec, tokens, text: TextRequest | EncodedText | None) -> tuple[np.ndarray | None, EncodedText | None]:
    """The ids a run is fed: explicit `tokens`, else the text through the checkpoint's tokenizer (or text already
    encoded), else None (the caller draws seeded ids). The default text on a checkpoint without a tokenizer gives None
    too: seeded ids are the fallback."""
    if isinstance(text, EncodedText):
        if tokens is not None:
            raise BughuntError("give either token ids or encoded text, not both.")
        return text.tokens, text
    if tokens is not None and text is not None and not text.default:
        raise BughuntError("give either token ids (--tokens, --tokens-file) or text (--prompt, --prompt-file, --chat), not both.")
    if tokens is not None:
        return np.atleast_2d(np.asarray(tokens, dtype=np.int64)), None
    if text is None or (text.default and not has_tokenizer(Path(checkpoint))):
        return None, None
    encoded = encode_text(checkpoint, text, spec)
    return encoded.tokens, encoded


def attach(data: dict, encoded: EncodedText | None, paths: dict[str, dict] | None = None) -> None:
    """Record the text in a result document (inputs.text, with each implementation's own tokenizer path under
    `paths`) and put its notes (cut rows, BOS counts) and the paths' differences first among the findings: they say
    what the ids mean before any numerics are read."""
    if encoded is None:
        return
    from bughunt.tokenizer_paths import judge_paths

    record = encoded.record()
    notes = [Finding("info", "input", n).to_dict() for n in encoded.notes]
    if paths:
        eos = data.get("checkpoint", {}).get("spec", {}).get("eos_token_id")
        notes += judge_paths(encoded, paths, eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else None)
        record["paths"] = paths
    data.setdefault("inputs", {})["text"] = record
    data["findings"][:0] = notes
