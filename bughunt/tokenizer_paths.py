"""Each implementation's own tokenizer path, on the same text: what `hf` (transformers' AutoTokenizer), `keras-jax`
and `keras-torch` (keras-hub's CausalLMPreprocessor, as its `generate` prepares a prompt), `deepmind` (DeepMind
gemma's `gm.text` tokenizer, as its Sampler encodes a prompt) and `llamacpp` (llama.cpp's tokenizer on the vocabulary
llama.cpp's converter wrote into the GGUF, as llama-cpp-python encodes a prompt) would feed their model, compared with
the ids every implementation was actually fed (the checkpoint's tokenizer, bughunt/text.py).

The numerics comparison always uses the same ids; a path that would tokenize differently is a finding of its own,
reported before any numerics ("keras-jax adds BOS twice", "ids differ from position 7").

`encode_path` runs inside the implementation's own process (its worker: its interpreter, its library versions,
its Keras backend), called through the worker protocol's "tokenize" job. A chat reaches each path the way a user of
that library would write it: hf renders and tokenizes with apply_chat_template; keras-hub has no chat templates, so
its preprocessor gets the text the checkpoint's template renders; gm.text formats turns with its own chat template;
llama-cpp-python renders the template the GGUF carries with its own Jinja2ChatFormatter and tokenizes the result.
llama.cpp's tokenizer can abort its process on text its vocabulary cannot encode: each text is tokenized in a forked
child, so an abort is that text's error, reported with what llama.cpp said, and the run goes on.
"""

from __future__ import annotations

from pathlib import Path

from bughunt.errors import BughuntError
from bughunt.findings import Finding

def has_path(name: str) -> bool:
    """Whether implementation `name` has a tokenizer path of its own (its runner says so)."""
    from bughunt.implementations import runner_class_unchecked

    return runner_class_unchecked(name).tokenizer_path is not None


def text_job(encoded) -> dict:
    """The text part of a "tokenize" job: prompts, or the chat's messages and the text the checkpoint renders."""
    if encoded.kind == "chat":
        row = encoded.rows[0]
        return {"chat": row["messages"], "rendered": row["text"], "add_generation_prompt": row["add_generation_prompt"]}
    return {"prompts": [r["text"] for r in encoded.rows]}


def encode_path(name: str, checkpoint: Path, text: dict) -> dict:
    """{"path": what ran, "rows": [ids per row]}: the ids implementation `name`'s own tokenizer path gives (its runner's
    `own_tokenizer`). Raises BughuntError when the path cannot tokenize this checkpoint (the reason is reported as a skip)."""
    from bughunt.implementations import runner_class_unchecked

    cls = runner_class_unchecked(name)
    if cls.tokenizer_path is None:
        raise BughuntError(f"implementation {name} has no tokenizer path of its own")
    return cls.own_tokenizer(Path(checkpoint), text)


def _leading(ids: list[int], tid: int | None) -> int:
    n = 0
    while tid is not None and n < len(ids) and ids[n] == tid:
        n += 1
    return n


def _times(n: int) -> str:
    return {0: "no BOS", 1: "BOS once", 2: "BOS twice"}.get(n, f"BOS {n} times")


def describe_difference(fed: list[int], path: list[int], bos: int | None, eos: int | None) -> str | None:
    """One sentence on how a path's ids differ from the ids fed, or None when they are the same."""
    if fed == path:
        return None
    parts = []
    a, b = _leading(fed, bos), _leading(path, bos)
    if a != b:
        parts.append(f"adds {_times(b)} where the checkpoint's tokenizer adds {_times(a)}")
    ea, eb = _leading(fed[::-1], eos), _leading(path[::-1], eos)
    if ea != eb:
        parts.append(f"ends with {eb} EOS where the checkpoint's tokenizer ends with {ea}")
    first = next((k for k, (x, y) in enumerate(zip(fed, path)) if x != y), min(len(fed), len(path)))
    tail = f"ids differ from position {first} ({len(path)} ids vs {len(fed)})"
    return "; ".join(parts + [tail])


def judge_paths(encoded, paths: dict[str, dict], eos: int | None = None) -> list[dict]:
    """Findings (warnings) for every implementation whose own path tokenizes the text differently from the ids fed.

    `paths` maps an implementation label to {"path": ..., "rows": [...]} or {"skipped": reason}."""
    findings = []
    bos = encoded.bos_token_id
    for label, p in paths.items():
        if "rows" not in p:
            continue
        for i, (row, ids) in enumerate(zip(encoded.rows, p["rows"])):
            diff = describe_difference(row["ids"], ids, bos, eos)
            p.setdefault("differences", []).append(diff)
            if diff is None:
                continue
            where = f" (row {i})" if len(encoded.rows) > 1 else ""
            findings.append(Finding("warning", "tokenizer", f"{label}'s own tokenizer path ({p['path']}) {diff}{where}; every "
                                    "implementation was fed the checkpoint tokenizer's ids, so the numerics below compare the "
                                    "same input", label).to_dict())
        p["agrees"] = all(d is None for d in p.get("differences", []))
    return findings
