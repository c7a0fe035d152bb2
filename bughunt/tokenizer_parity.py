"""Tokenizer parity: encode a built-in corpus of tricky strings with every tokenizer implementation that can
read a checkpoint (the `tokenizers` library on tokenizer.json, transformers' AutoTokenizer, sentencepiece on
tokenizer.model, keras-hub, llama.cpp's tokenizer on the vocabulary its converter writes) and report every string on
which they give different ids. llama.cpp's runs in a worker process, each string in a forked child there: its
tokenizer can abort the process on text its vocabulary cannot encode, and that is recorded as the string's error.

Traces are fed token ids, never text (DESIGN.md), so this is where text-to-ids differences are caught.
Implementations that cannot run here are skipped with the reason recorded, never silently dropped.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bughunt.errors import BughuntError

TRICKY_STRINGS = Path(__file__).parent / "data" / "tricky_strings.json"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class TokenizerImpl:
    """One way to turn text into ids, with the BOS/EOS ids it is expected to use."""

    name: str
    encode: Callable[[str], list[int]]
    description: str
    bos_id: int | None = None
    eos_id: int | None = None


@dataclass
class ParityReport:
    """Which implementations ran, which were skipped and why, and every disagreement with the reference."""

    checkpoint: str
    reference: str | None
    implementations: list[dict]
    skipped: list[dict]
    strings: int
    disagreements: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.disagreements

    def to_dict(self) -> dict:
        return {"schema": "bughunt.tokenizer_parity", "version": SCHEMA_VERSION, "checkpoint": self.checkpoint,
                "reference": self.reference, "implementations": self.implementations, "skipped": self.skipped,
                "strings": self.strings, "disagreements": self.disagreements}


def tricky_strings(path: Path = TRICKY_STRINGS) -> list[tuple[str, str]]:
    """(name, text) pairs: whitespace runs, newlines, tabs, combining marks, CJK, emoji with ZWJ, long numbers,
    special tokens written as text, very long words."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [(s["name"], s["text"]) for s in data["strings"]]


def _tokenizer_config(checkpoint: Path) -> dict:
    path = checkpoint / "tokenizer_config.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BughuntError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}). Fix or re-save the tokenizer.") from None


def _special_ids(checkpoint: Path) -> tuple[int | None, int | None]:
    """BOS/EOS ids from config.json (the model's view); EOS lists give their first entry."""
    try:
        cfg = json.loads((checkpoint / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None, None
    eos = cfg.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return cfg.get("bos_token_id"), eos


def available_tokenizers(checkpoint: Path, stack: contextlib.ExitStack | None = None) -> tuple[list[TokenizerImpl], list[dict]]:
    """Every tokenizer implementation that can encode this checkpoint's text, and the skipped ones with reasons. With
    `stack`, llama.cpp's tokenizer is included: its worker process lives until the stack closes."""
    checkpoint = Path(checkpoint)
    bos, eos = _special_ids(checkpoint)
    impls: list[TokenizerImpl] = []
    skipped: list[dict] = []
    tok_json = checkpoint / "tokenizer.json"
    spm_model = checkpoint / "tokenizer.model"
    tcfg = _tokenizer_config(checkpoint)

    if tok_json.exists():
        import tokenizers

        raw = tokenizers.Tokenizer.from_file(str(tok_json))
        impls.append(TokenizerImpl("tokenizers", lambda s: raw.encode(s).ids,
                                   f"tokenizers {tokenizers.__version__}: tokenizer.json as written", bos, eos))
    else:
        skipped.append({"name": "tokenizers", "reason": "no tokenizer.json in the checkpoint"})

    if tok_json.exists() or spm_model.exists():
        import transformers

        try:
            auto = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
        except Exception as e:  # a library failing to load is a result, not a crash
            skipped.append({"name": "transformers", "reason": f"AutoTokenizer failed: {type(e).__name__}: {e}"})
        else:
            impls.append(TokenizerImpl("transformers", lambda s: list(auto(s)["input_ids"]),
                                       f"transformers {transformers.__version__} AutoTokenizer ({type(auto).__name__})", bos, eos))
    else:
        skipped.append({"name": "transformers", "reason": "no tokenizer.json or tokenizer.model in the checkpoint"})

    # The sentencepiece model adds no BOS itself; the slow HF tokenizers prepend it when add_bos_token (default true).
    add_bos = bool(tcfg.get("add_bos_token", True))
    add_eos = bool(tcfg.get("add_eos_token", False))
    if not spm_model.exists():
        skipped.append({"name": "sentencepiece", "reason": "no tokenizer.model in the checkpoint"})
    else:
        try:
            import sentencepiece
        except ImportError:
            skipped.append({"name": "sentencepiece", "reason": "sentencepiece is not installed (pip install sentencepiece)"})
        else:
            sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
            sp_bos, sp_eos = sp.bos_id(), sp.eos_id()
            impls.append(TokenizerImpl(
                "sentencepiece",
                lambda s: ([sp_bos] if add_bos and sp_bos >= 0 else []) + list(sp.encode(s)) + ([sp_eos] if add_eos and sp_eos >= 0 else []),
                f"sentencepiece {sentencepiece.__version__} on tokenizer.model (add_bos={add_bos}, add_eos={add_eos} "
                "from tokenizer_config.json)", bos, eos))

    try:
        import keras_hub  # noqa: F401
    except ImportError:
        skipped.append({"name": "keras-hub", "reason": "keras_hub is not importable in this environment"})
    else:
        if not spm_model.exists():
            skipped.append({"name": "keras-hub", "reason": "keras-hub's tokenizers need tokenizer.model, which the checkpoint lacks"})
        else:
            try:
                kh = keras_hub.tokenizers.SentencePieceTokenizer(proto=str(spm_model))
                kh_bos = bos if add_bos else None  # keras-hub's CausalLM preprocessors add the start token

                def kh_encode(s: str) -> list[int]:
                    ids = [int(i) for i in kh.tokenize(s)]
                    return ([kh_bos] if kh_bos is not None else []) + ids

                impls.append(TokenizerImpl("keras-hub", kh_encode,
                                           f"keras-hub {keras_hub.__version__} SentencePieceTokenizer (start token as add_bos_token)", bos, eos))
            except Exception as e:
                skipped.append({"name": "keras-hub", "reason": f"keras-hub tokenizer failed: {type(e).__name__}: {e}"})
    if stack is not None:
        _add_llamacpp(checkpoint, bos, eos, stack, impls, skipped)
    return impls, skipped


def _add_llamacpp(checkpoint: Path, bos: int | None, eos: int | None, stack: contextlib.ExitStack,
                  impls: list[TokenizerImpl], skipped: list[dict]) -> None:
    """llama.cpp's tokenizer (bughunt/tokenizer_paths.py's llamacpp path: a --vocab-only conversion, Llama.tokenize)
    in a worker; skipped with the reason when llama-cpp-python is absent or the converter writes no vocabulary."""
    from bughunt.implementations import available

    if not available("llamacpp"):
        skipped.append({"name": "llama.cpp", "reason": "llama-cpp-python is not installed (make llamacpp)"})
        return
    from bughunt.probes.tokenizer_path import TokenizeJob, tokenize
    from bughunt.worker import WorkerFailure, WorkerPool

    pool = stack.enter_context(WorkerPool())

    def job(texts: list[str]) -> dict:
        return tokenize(pool, TokenizeJob("llamacpp", checkpoint, {"prompts": texts, "row_errors": True}), None, 600)

    try:
        probe = job(["a"])  # converts the vocabulary once (cached), or says why there is none
    except WorkerFailure as e:
        skipped.append({"name": "llama.cpp", "reason": str(e).split("; its last output")[0]})
        return
    done: dict[str, tuple[list[int] | None, str | None]] = {}

    def encode(text: str) -> list[int]:
        """One job per corpus (each text in a forked child there, so an abort costs one text), asked on first use."""
        if text not in done:
            texts = [t for _, t in tricky_strings()] if not done else []
            texts = texts if text in texts else [text]
            answer = job(texts)
            for i, t in enumerate(texts):
                done[t] = (answer["rows"][i], answer.get("errors", {}).get(str(i)) or answer.get("errors", {}).get(i))
        ids, error = done[text]
        if error is not None:
            raise RuntimeError(error)
        return ids

    impls.append(TokenizerImpl("llama.cpp", encode, probe["path"], bos, eos))


def _encode(impl: TokenizerImpl, text: str) -> tuple[list[int] | None, str | None]:
    try:
        return [int(i) for i in impl.encode(text)], None
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def _run(ids: list[int], tid: int | None) -> int:
    """How many times `tid` repeats at the start of ids (BOS counts as a run: "<bos>" written as text adds one)."""
    n = 0
    while tid is not None and n < len(ids) and ids[n] == tid:
        n += 1
    return n


def _strip(ids: list[int], bos: int | None, eos: int | None) -> list[int]:
    start = _run(ids, bos)
    end = len(ids) - _run(ids[start:][::-1], eos)
    return ids[start:end]


def compare_tokenizers(impls: list[TokenizerImpl], strings: list[tuple[str, str]], checkpoint: str = "",
                       skipped: list[dict] | None = None) -> ParityReport:
    """Encode every string with every implementation; the first implementation is the reference."""
    report = ParityReport(checkpoint=checkpoint, reference=impls[0].name if impls else None,
                          implementations=[{"name": i.name, "description": i.description} for i in impls],
                          skipped=list(skipped or []), strings=len(strings))
    if len(impls) < 2:
        return report
    ref = impls[0]
    for name, text in strings:
        ref_ids, ref_err = _encode(ref, text)
        for cand in impls[1:]:
            ids, err = _encode(cand, text)
            if ids == ref_ids and err == ref_err:
                continue
            entry = {"name": name, "text": text, "reference": ref.name, "candidate": cand.name,
                     "reference_ids": ref_ids, "candidate_ids": ids}
            if ref_err or err:
                entry["reference_error"], entry["candidate_error"] = ref_err, err
            else:
                bos, eos = ref.bos_id, ref.eos_id
                entry["bos_differs"] = _run(ref_ids, bos) != _run(ids, bos)
                entry["eos_differs"] = _run(ref_ids[::-1], eos) != _run(ids[::-1], eos)
                entry["body_differs"] = _strip(ref_ids, bos, eos) != _strip(ids, bos, eos)
                entry["first_difference"] = next((k for k, (a, b) in enumerate(zip(ref_ids, ids)) if a != b),
                                                 min(len(ref_ids), len(ids)))
            report.disagreements.append(entry)
    return report


def tokenizer_parity(checkpoint: Path, strings: list[tuple[str, str]] | None = None) -> ParityReport:
    """Run every available tokenizer implementation of a checkpoint over the tricky-strings corpus."""
    from bughunt import sources

    checkpoint = sources.resolve(checkpoint)
    if not checkpoint.is_dir():
        raise BughuntError(f"{checkpoint} is not a checkpoint directory. Pass the directory holding config.json and the tokenizer files.")
    with contextlib.ExitStack() as stack:
        impls, skipped = available_tokenizers(checkpoint, stack)
        return compare_tokenizers(impls, strings if strings is not None else tricky_strings(), str(checkpoint), skipped)


def format_parity(report: ParityReport, limit: int = 10) -> str:
    """A short terminal summary: implementations, skips, and the first few disagreements."""
    return format_parity_dict(report.to_dict(), limit)


def format_parity_dict(report: dict, limit: int = 10) -> str:
    """format_parity for the JSON form (as stored in the lint document)."""
    lines = [f"tokenizer parity · {report['strings']} strings · reference {report['reference'] or '–'}"]
    for i in report["implementations"]:
        lines.append(f"  ran      {i['name']:<14} {i['description']}")
    for s in report["skipped"]:
        lines.append(f"  skipped  {s['name']:<14} {s['reason']}")
    if len(report["implementations"]) < 2:
        lines.append("  fewer than two implementations ran: nothing to compare")
    elif not report["disagreements"]:
        lines.append("  all implementations agree on every string")
    for d in report["disagreements"][:limit]:
        what = "error" if "candidate_error" in d else ", ".join(
            k.replace("_differs", "") for k in ("bos_differs", "eos_differs", "body_differs") if d.get(k)) or "ids"
        lines.append(f"  DIFFERS  {d['name']:<24} {d['reference']} vs {d['candidate']} ({what}): "
                     f"{_short(d['reference_ids'])} vs {_short(d['candidate_ids'])}")
    if len(report["disagreements"]) > limit:
        lines.append(f"  ... and {len(report['disagreements']) - limit} more (see the JSON output)")
    return "\n".join(lines)


def _short(ids: list[int] | None, n: int = 12) -> str:
    if ids is None:
        return "error"
    return "[" + ", ".join(map(str, ids[:n])) + (", ..." if len(ids) > n else "") + "]"
