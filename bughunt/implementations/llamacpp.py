"""The `llamacpp` implementation: llama.cpp's own graph (through llama-cpp-python's low-level API) on a GGUF made by
llama.cpp's own converter, captured at every layer through the graph's eval callback.

The checkpoint is converted with the vendored `convert_hf_to_gguf.py` (`--outtype` always given), cached by content
hash (gguf_convert.py); quantized types (`llamacpp:q8_0`, `llamacpp:q4_k_m`) are made from the f32 GGUF by
llama.cpp's own quantizer (`llama_model_quantize`). Runtime settings are the toggles `kv_cache` (the K/V cache
type) and `flash_attn`; their defaults are what a llama.cpp user gets, and the trace records the values used."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from bughunt.errors import BughuntError
from bughunt.implementations.base import Runner

from bughunt.implementations import QUANT_FTYPES as QUANT_TYPES  # bughunt dtype name -> llama_ftype (llama.h)

KV_CACHE_TYPES = {"f16": 1, "f32": 0, "bf16": 30, "q8_0": 8}  # ggml_type of the K and V cache
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # llama_flash_attn_type
# HF config architectures whose GGUF llama.cpp builds a graph for, by bughunt family (mistral converts to `llama`)
FAMILY_ARCH = {"llama": "llama", "mistral": "llama", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3",
               "phi3": "phi3", "qwen2": "qwen2", "qwen3": "qwen3"}


_LOG: list[str] = []  # llama.cpp's last log lines (the reason, when a load fails), instead of printing them
_LOG_CALLBACK = None  # kept for the life of the process: llama.cpp holds the pointer until it is replaced


def _install_log() -> None:
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        import llama_cpp

        def log(level, text, user_data):
            _LOG.append((text or b"").decode("utf-8", "replace"))
            del _LOG[:-200]

        _LOG_CALLBACK = llama_cpp.llama_log_callback(log)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def _last_log() -> str:
    lines = [ln.strip() for ln in "".join(_LOG).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
    return "; ".join((errors or lines)[-3:]) or "llama.cpp logged nothing"


def gguf_file(checkpoint: Path, dtype: str, vocab: str = "auto") -> tuple[Path, dict]:
    """The cached GGUF llama.cpp runs for `dtype`: the converter's output for fp32/fp16/bf16; for a quantized type,
    llama.cpp's own quantizer (`llama_model_quantize`) applied to the converter's f32 output (tensors whose rows do
    not fit the type's block fall back as llama.cpp decides; the GGUF records the type each tensor got)."""
    from bughunt import sources
    from bughunt.implementations import gguf_convert

    native = sources.native_gguf(checkpoint)
    if native is not None and native[1] == dtype:  # a GGUF checkpoint at its own type: llama.cpp runs the file itself
        return native[0], _native_record(sources.describe(checkpoint), dtype)
    path, record = gguf_convert.convert(checkpoint, "fp32" if dtype in QUANT_TYPES else dtype, vocab)
    record = dict(record)
    if dtype not in QUANT_TYPES:
        return path, record
    import llama_cpp

    _install_log()
    out = path.with_name(path.name.replace("-f32-", f"-{dtype}-"))
    if not out.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = QUANT_TYPES[dtype]
        params.nthread = min(4, os.cpu_count() or 1)
        tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
        try:
            rc = llama_cpp.llama_model_quantize(str(path).encode(), str(tmp).encode(), ctypes.byref(params))
            if rc != 0:
                raise BughuntError(f"llama.cpp's quantizer failed to make {dtype} from {path} (code {rc}): {_last_log()}")
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                tmp.unlink()
    record["quantized"] = {"type": dtype, "by": "llama_model_quantize", "from": "f32"}
    return out, record


def _native_record(view: dict, dtype: str) -> dict:
    """The conversion record of a GGUF checkpoint run as it is (nothing converted or quantized by bughunt), from what
    its view recorded when it was derived (the file is not read again)."""
    return {"gguf_arch": view["gguf_architecture"], "source": "the GGUF checkpoint's own file, run as it is",
            "file": view["file"], "type": dtype, "vocabulary": view["vocabulary"]}


class LlamaCppRunner(Runner):
    tokenizer_path = "llama.cpp's tokenizer on the converted GGUF"  # its own tokenizer path (bughunt/probes/tokenizer_path.py)
    @classmethod
    def own_tokenizer(cls, checkpoint: Path, text: dict) -> dict:
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

    name = "llamacpp"
    install_hint = "make llamacpp   (builds llama-cpp-python from source; requirements/llamacpp.txt)"  # how to install its stack (bughunt implementations prints it)
    families = tuple(FAMILY_ARCH)
    dtypes = ("fp32", "fp16", "bf16", *QUANT_TYPES)
    devices = ("cpu",)
    toggle_support = {"bos": None, "kv_cache": None, "flash_attn": None,
                      "rope_theta": None, "rope_theta_source": None}  # llama_context_params.rope_freq_base
    # context settings: every run makes a new context anyway
    live_toggles = frozenset({"bos", "kv_cache", "flash_attn", "rope_theta", "rope_theta_source"})

    @classmethod
    def native_dtype(cls, checkpoint: Path) -> str | None:
        """A GGUF checkpoint's own type: without a dtype, llamacpp runs the file itself."""
        from bughunt import sources

        native = sources.native_gguf(checkpoint)
        return native[1] if native else None

    def __init__(self, *args, vocab: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        from bughunt.toggles import changed

        if {"rope_theta", "rope_theta_source"} & set(changed(self.spec, self.toggles)) and \
                FAMILY_ARCH[self.spec.family] not in ("llama", "gemma", "qwen2", "qwen3"):
            raise BughuntError(f"implementation 'llamacpp' cannot apply rope_theta to {self.spec.family}: llama.cpp's "
                               "rope_freq_base setting moves only the full-attention layers' base, not the sliding ones'.")
        self.vocab = vocab
        self.model = None
        self.conversion: dict = {}

    # -- conversion ---------------------------------------------------------------------------------
    def _gguf(self) -> Path:
        path, record = gguf_file(self.checkpoint, self.dtype, self.vocab)
        self.conversion = record
        return path

    # -- life cycle ---------------------------------------------------------------------------------
    def _open(self) -> None:
        import llama_cpp

        _install_log()
        self.gguf_path = self._gguf()
        arch = self.conversion.get("gguf_arch")
        if arch != FAMILY_ARCH[self.spec.family]:
            raise BughuntError(f"llama.cpp's converter wrote architecture {arch!r} for family {self.spec.family}; "
                               f"bughunt captures {FAMILY_ARCH[self.spec.family]!r} there.")
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(self.gguf_path).encode(), params)
        if not self.model:
            raise BughuntError(f"llama.cpp could not load {self.gguf_path} (converted from {self.checkpoint}): {_last_log()}")
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        if n_vocab != self.spec.vocab_size:
            raise BughuntError(f"llama.cpp reads a vocabulary of {n_vocab} tokens from the GGUF, but config.json says "
                               f"vocab_size={self.spec.vocab_size}.")

    def settings(self) -> dict[str, str]:
        """The runtime settings this run uses (defaults: what llama.cpp gives a user who sets nothing)."""
        from bughunt.toggles import TOGGLES

        return {k: self.toggles.get(k, TOGGLES[k].default(self.spec)) for k in ("kv_cache", "flash_attn")}

    def _context(self, n_tokens: int, capture):
        import llama_cpp

        c = llama_cpp.llama_context_default_params()
        settings = self.settings()
        c.n_ctx = c.n_batch = c.n_ubatch = n_tokens  # one micro-batch: one graph holds every position
        c.n_seq_max = 1
        c.n_threads = c.n_threads_batch = min(4, os.cpu_count() or 1)
        c.type_k = c.type_v = KV_CACHE_TYPES[settings["kv_cache"]]
        c.flash_attn_type = FLASH_ATTN[settings["flash_attn"]]
        theta = self.toggles.get("rope_theta") or ("10000.0" if self.toggles.get("rope_theta_source") == "default" else None)
        if theta is not None:
            c.rope_freq_base = float(theta)  # 0 (the default) = the GGUF's value
        c.no_perf = True
        self._cb = llama_cpp.ggml_backend_sched_eval_callback(capture)
        c.cb_eval = self._cb
        ctx = llama_cpp.llama_init_from_model(self.model, c)
        if not ctx:
            raise BughuntError(f"llama.cpp could not create a context for {n_tokens} tokens with {settings}: {_last_log()}")
        return ctx

    def _run(self, tokens: np.ndarray, out) -> None:
        import llama_cpp

        from bughunt.implementations.ggml_capture import PLANS, Ggml, GraphCapture

        ggml = Ggml()
        per_sequence = []
        for row in tokens:
            capture = GraphCapture(ggml, PLANS[FAMILY_ARCH[self.spec.family]], self.spec.num_layers, self.branches)
            n = len(row)
            ctx = self._context(n, capture)
            batch = llama_cpp.llama_batch_init(n, 0, 1)
            try:
                for i, token in enumerate(row):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(token), i, 1
                    batch.seq_id[i][0], batch.logits[i] = 0, 1  # logits at every position, not only the last
                batch.n_tokens = n
                rc = llama_cpp.llama_decode(ctx, batch)
                if capture.error is not None:
                    raise capture.error
                if rc != 0:
                    raise BughuntError(f"llama_decode failed (code {rc}): {_last_log()}")
                n_vocab = self.spec.vocab_size
                logits = np.stack([np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy()
                                   for i in range(n)])
            finally:
                llama_cpp.llama_batch_free(batch)
                llama_cpp.llama_free(ctx)
            missing = [p for p in capture.expected() if p not in capture.arrays]
            if missing:
                raise BughuntError(f"llama.cpp's graph for {self.spec.family} produced no node for {', '.join(missing[:6])}"
                                   f"{' ...' if len(missing) > 6 else ''} (captured {len(capture.arrays)} points).")
            capture.arrays = {p: a.reshape(n, -1) for p, a in capture.arrays.items()}  # ggml [1, 1, tokens, width]
            capture.arrays["logits"] = logits
            self.graph_nodes = capture.order
            per_sequence.append(capture.arrays)
        for point in per_sequence[0]:
            out[point] = np.stack([arrays[point] for arrays in per_sequence])

    # -- weight check (bughunt/weightcheck.py) --------------------------------------------------------
    exposes_weights = True

    def loaded_weights(self):
        """The GGUF's tensors as llama.cpp loads them, read back with gguf-py, in checkpoint names and layout (a GGUF
        [ne1, ne0] tensor is HF's [out, in] already). The converter's Q/K row permutation for ggml's RoPE (llama
        architecture: convert_hf_to_gguf's LlamaModel.permute) is undone exactly; Gemma's (1 + w) folded into the norm
        weights is left for the check to name ("offset by 1"), since subtracting 1 again in fp32 would not give w back."""
        if self.dtype in QUANT_TYPES:
            raise BughuntError(f"the weight check compares float tensors; a {self.dtype} GGUF differs from the checkpoint by "
                               "design (its quantization floor is what judges it). Check llamacpp:fp32, fp16 or bf16.")
        from bughunt.checkpoint import load_weights
        from bughunt.implementations.quantized_weights import _unpermute, import_gguf

        gguf = import_gguf()
        reader = gguf.GGUFReader(str(self.gguf_path))
        stored = {t.name: t for t in reader.tensors}
        arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == FAMILY_ARCH[self.spec.family])
        names = gguf.get_tensor_name_map(arch, self.spec.num_layers)
        for name, array in load_weights(self.checkpoint, self.spec, self.allow_pickle).items():
            if name == "lm_head.weight" and self.spec.tie_word_embeddings:
                continue  # llama.cpp decodes with token_embd: checked as the embedding
            tensor = stored.get(names.get_name(name, try_suffixes=(".weight", ".bias")) or "")
            if tensor is None:
                continue  # not carried into the GGUF: the check lists it as not exposed
            values = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(array.shape)
            if FAMILY_ARCH[self.spec.family] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                values = _unpermute(values, self.spec.num_heads if "q_proj" in name else self.spec.num_kv_heads)
            yield name, values

    def _close(self) -> None:
        if self.model is not None:
            import llama_cpp

            llama_cpp.llama_model_free(self.model)
            self.model = None

    def finish(self, out, tokens, seconds, **timings):
        trace = super().finish(out, tokens, seconds, **timings)
        trace.meta.update(conversion=self.conversion, llamacpp_settings=self.settings(),
                          graph_nodes={point: name for name, point in getattr(self, "graph_nodes", [])})
        if trace.stem is not None:
            trace.save_meta()
        return trace

    def versions(self) -> dict[str, str]:
        import llama_cpp

        source = self.conversion.get("converter", {})
        return {"llama_cpp_python": llama_cpp.__version__,
                "llama_cpp_commit": source.get("llama_cpp_commit", "unknown") if source.get("llama_cpp_python") ==
                llama_cpp.__version__ else "unknown (the converter's source archive is another version)",
                "build_flags": source.get("wheel_cmake_args") or "unknown (not built by `make llamacpp`)",
                "system_info": llama_cpp.llama_print_system_info().decode().strip(),
                "converter": f"convert_hf_to_gguf.py from llama-cpp-python {source.get('llama_cpp_python', '?')} sdist"}


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
