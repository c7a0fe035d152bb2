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

PATH_NAMES = {"hf": "transformers AutoTokenizer", "keras-jax": "keras-hub CausalLMPreprocessor",
              "keras-torch": "keras-hub CausalLMPreprocessor", "deepmind": "DeepMind gemma gm.text tokenizer",
              "llamacpp": "llama.cpp's tokenizer on the converted GGUF"}


def has_path(name: str) -> bool:
    return name in PATH_NAMES


def text_job(encoded) -> dict:
    """The text part of a "tokenize" job: prompts, or the chat's messages and the text the checkpoint renders."""
    if encoded.kind == "chat":
        row = encoded.rows[0]
        return {"chat": row["messages"], "rendered": row["text"], "add_generation_prompt": row["add_generation_prompt"]}
    return {"prompts": [r["text"] for r in encoded.rows]}


def encode_path(name: str, checkpoint: Path, text: dict) -> dict:
    """{"path": what ran, "rows": [ids per row]}: the ids implementation `name`'s own tokenizer path gives. Raises
    BughuntError when the path cannot tokenize this checkpoint (the reason is reported as a skip)."""
    checkpoint = Path(checkpoint)
    if name == "hf":
        return _hf(checkpoint, text)
    if name in ("keras-jax", "keras-torch"):
        return _keras(checkpoint, text)
    if name == "deepmind":
        return _deepmind(checkpoint, text)
    if name == "llamacpp":
        return _llamacpp(checkpoint, text)
    raise BughuntError(f"implementation {name} has no tokenizer path of its own")


def _hf(checkpoint: Path, text: dict) -> dict:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
    what = f"transformers {transformers.__version__} AutoTokenizer ({type(tok).__name__})"
    if "chat" in text:
        ids = tok.apply_chat_template(text["chat"], tokenize=True, add_generation_prompt=text["add_generation_prompt"],
                                      return_dict=True)["input_ids"]
        return {"path": what + ", apply_chat_template", "rows": [[int(i) for i in ids]]}
    return {"path": what, "rows": [[int(i) for i in tok(p)["input_ids"]] for p in text["prompts"]]}


def _keras(checkpoint: Path, text: dict) -> dict:
    import numpy as np

    try:
        import keras_hub
    except ImportError as e:
        raise BughuntError(f"keras-hub cannot be imported in this process ({e}); its tokenizer path runs in the keras "
                           "worker, where KERAS_BACKEND is set before keras is imported") from None

    try:
        pre = keras_hub.models.CausalLMPreprocessor.from_preset(str(checkpoint))
    except Exception as e:  # the library cannot read this checkpoint's tokenizer: a skip with its reason
        raise BughuntError(f"keras-hub cannot build a preprocessor for this checkpoint: {type(e).__name__}: {str(e)[:300]}") from None
    what = f"keras-hub {keras_hub.__version__} {type(pre).__name__}.generate_preprocess"
    prompts = [text["rendered"]] if "chat" in text else text["prompts"]
    rows = []
    for p in prompts:
        pre.sequence_length = 2 * len(p.encode("utf-8")) + 8  # room for every byte and the start/end tokens
        out = pre.generate_preprocess([p])
        ids, mask = np.asarray(out["token_ids"])[0], np.asarray(out["padding_mask"])[0].astype(bool)
        rows.append([int(i) for i in ids[mask]])
    return {"path": what + (" on the text the checkpoint's chat template renders" if "chat" in text else ""), "rows": rows}


def _deepmind(checkpoint: Path, text: dict) -> dict:
    spm = checkpoint / "tokenizer.model"
    if not spm.exists():
        raise BughuntError("DeepMind gemma's tokenizer reads a SentencePiece tokenizer.model, which this checkpoint lacks")
    from bughunt.implementations import _tf_stub

    _tf_stub.install()  # kauldron imports tensorflow at import time
    from gemma import gm
    from gemma.gm.text import _template

    import json

    family = json.loads((checkpoint / "config.json").read_text()).get("model_type", "")
    cls = gm.text.Gemma3Tokenizer if family.startswith("gemma3") else gm.text.Gemma2Tokenizer
    tok = cls(path=str(spm))
    from importlib.metadata import version

    what = f"DeepMind gemma {version('gemma')} {cls.__name__}.encode(add_bos=True)"
    if "chat" in text:
        parts = []
        for m in text["chat"]:
            if m["role"] == "user":
                parts.append(_template.PROMPT.format(m["content"]))
            elif m["role"] in ("assistant", "model"):
                parts.append(_template.ANSWER.format(m["content"]))
            else:
                raise BughuntError(f"gm.text's chat format has user and model turns only; this chat has role {m['role']!r}")
        return {"path": what + " on turns formatted with gm.text's chat template", "rows": [[int(i) for i in tok.encode("".join(parts), add_bos=True)]]}
    return {"path": what, "rows": [[int(i) for i in tok.encode(p, add_bos=True)] for p in text["prompts"]]}


def _llamacpp(checkpoint: Path, text: dict) -> dict:
    """llama.cpp's tokenizer as llama-cpp-python drives it: `Llama.tokenize(text, add_bos=True)` (BOS as the GGUF's
    tokenizer.ggml.add_bos_token says), and for a chat the GGUF's own template rendered by its Jinja2ChatFormatter and
    tokenized with special tokens parsed (no BOS added: the formatter's prompt carries what the template writes), as
    create_chat_completion does. The vocabulary is the one the converter wrote; a GGUF converted without one (the
    converter refused the tokenizer) has no tokenizer path. Only the vocabulary is converted (--vocab-only), so an 8B
    checkpoint's path costs seconds, not a full conversion.

    llama.cpp's tokenizer can abort the process on text its vocabulary cannot encode, so each text is tokenized in a
    forked child: an abort is that text's error (with what llama.cpp said), not the end of the worker. With
    text["row_errors"], rows that failed are None and "errors" maps their index to the reason; otherwise the first
    failure raises BughuntError."""
    import llama_cpp
    from llama_cpp import llama_chat_format

    from bughunt.implementations.gguf_convert import VOCAB_ONLY, convert

    path, record = convert(checkpoint, VOCAB_ONLY)  # --vocab-only: the tokenizer without converting any weight
    if record.get("vocabulary") != "real":
        raise BughuntError("llama.cpp has no tokenizer for this checkpoint: its GGUF was converted without a vocabulary "
                           f"({record.get('vocabulary_reason') or 'vocabulary-less conversion'})")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    what = f"llama-cpp-python {llama_cpp.__version__} Llama.tokenize on the GGUF's {llm.metadata.get('tokenizer.ggml.model', '?')} vocabulary"
    if "chat" in text:
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise BughuntError("the GGUF carries no chat template (tokenizer.chat_template), so llama-cpp-python has no chat path for it")

        def piece(token: int) -> str:
            return llm.detokenize([token], special=True).decode("utf-8", "replace") if token >= 0 else ""

        formatter = llama_chat_format.Jinja2ChatFormatter(template=template, eos_token=piece(llm.token_eos()),
                                                          bos_token=piece(llm.token_bos()),
                                                          add_generation_prompt=text["add_generation_prompt"])
        result = formatter(messages=text["chat"])
        calls = [lambda: llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)]
        what += ", chat through its Jinja2ChatFormatter"
    else:
        calls = [lambda p=p: llm.tokenize(p.encode("utf-8"), add_bos=True, special=False) for p in text["prompts"]]
        what += " (add_bos=True)"
    rows, errors = [], {}
    for i, call in enumerate(calls):
        ids, error = _in_forked_child(call)
        if error is not None and not text.get("row_errors"):
            raise BughuntError(f"llama.cpp's tokenizer failed on text {i}: {error}")
        rows.append(ids)
        if error is not None:
            errors[i] = error
    return {"path": what, "rows": rows, **({"errors": errors} if errors else {})}


def _in_forked_child(call) -> tuple[list[int] | None, str | None]:
    """(ids, None) from `call()` run in a forked child, or (None, why) when it raised or the child died (a native abort:
    its stderr, e.g. "terminate called after throwing an instance of 'std::out_of_range'", is the reason)."""
    import json
    import os
    import signal

    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: tokenize, answer, and leave without running any of the parent's cleanup
        try:
            os.close(out_r)
            os.close(err_r)
            os.dup2(err_w, 2)
            os.environ["GGML_NO_BACKTRACE"] = "1"  # ggml would otherwise run gdb on abort to print a backtrace
            try:
                answer = {"ids": [int(i) for i in call()]}
            except BaseException as e:  # noqa: BLE001 - reported to the parent as this text's error
                answer = {"error": f"{type(e).__name__}: {e}"}
            data = json.dumps(answer).encode()
            while data:
                data = data[os.write(out_w, data):]
        finally:
            os._exit(0)
    os.close(out_w)
    os.close(err_w)
    chunks, errs = [], []
    for fd, sink in ((out_r, chunks), (err_r, errs)):
        while block := os.read(fd, 65536):
            sink.append(block)
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    if data:
        answer = json.loads(data)
        return answer.get("ids"), answer.get("error")
    said = " ".join(ln.strip() for ln in b"".join(errs).decode("utf-8", "replace").splitlines()
                    if "terminate called" in ln or "what()" in ln or "GGML_ASSERT" in ln or "error" in ln.lower())
    how = f"signal {signal.Signals(-os.waitstatus_to_exitcode(status)).name}" if os.WIFSIGNALED(status) else f"exit {os.waitstatus_to_exitcode(status)}"
    return None, f"llama.cpp aborted the process ({how})" + (f": {said[:300]}" if said else "")


# ------------------------------------------------------------------------------------------------
# Judging the paths against the ids every implementation was fed
# ------------------------------------------------------------------------------------------------

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
