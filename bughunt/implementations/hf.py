"""The `hf` implementation: Hugging Face transformers on PyTorch (eager attention), capture points taken
with forward hooks on the real modules, never by editing model code. Hooks are removed after every run."""

from __future__ import annotations

import tempfile

from pathlib import Path

import numpy as np

from bughunt.errors import BughuntError
from bughunt.implementations.base import Runner, decoder_points
from bughunt import points as P

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}


def _tensor(output):
    """A module's main output tensor (decoder layers and attention return tuples in some versions)."""
    return output[0] if isinstance(output, (tuple, list)) else output


class HFRunner(Runner):
    tokenizer_path = "transformers AutoTokenizer"  # its own tokenizer path (bughunt/probes/tokenizer_path.py)
    @classmethod
    def own_tokenizer(cls, checkpoint: Path, text: dict) -> dict:
        """The ids this library's own tokenizer path gives for `text` (bughunt/tokenizer_paths.py)."""
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
        what = f"transformers {transformers.__version__} AutoTokenizer ({type(tok).__name__})"
        if "chat" in text:
            ids = tok.apply_chat_template(text["chat"], tokenize=True, add_generation_prompt=text["add_generation_prompt"],
                                          return_dict=True)["input_ids"]
            return {"path": what + ", apply_chat_template", "rows": [[int(i) for i in ids]]}
        return {"path": what, "rows": [[int(i) for i in tok(p)["input_ids"]] for p in text["prompts"]]}

    name = "hf"
    install_hint = "pip install -e .   (bughunt's core)"  # how to install its stack (bughunt implementations prints it)
    library_gb = 0.6  # torch and transformers, resident (bughunt/memory.py)
    families = ("gemma", "gemma2", "gemma3", "llama", "mistral", "phi3", "qwen2", "qwen3")
    dtypes = ("fp32", "bf16", "fp16", "fp64")
    devices = ("cpu", "cuda")
    supports_device_map = True
    toggle_support = {
        "bos": None,
        "gelu": None,  # swap the MLP's activation module for transformers' own ACT2FN entry
        "rope_dtype": None,  # wrap rotary_emb.forward: round its inv_freq buffer(s) and the positions to the model dtype
        "rope_pairing": None,  # wrap apply_rotary_pos_emb: permute features so HF's rotate_half pairs (2i, 2i+1)
        "embed_scale_dtype": None,  # forward hook on the scaled embedding: the fp32 scale applied before one rounding
        "sliding_window": None,  # config.sliding_window
        "attn_softcap": None,  # config.attn_logit_softcapping (families whose modeling code reads it)
        "final_softcap": None,  # config.final_logit_softcapping (idem)
        "query_scale": None,  # each attention module's `scaling` attribute
        "rope_theta": None,  # config.rope_parameters[...]["rope_theta"]
        "rms_eps": None,  # config.rms_norm_eps
        "rope_positions": None,  # wrap rotary_emb.forward: round the positions to the model dtype
        "rope_theta_source": None,  # config.rope_parameters[...]["rope_theta"] = 10000
        "longrope_switch": "transformers decides inside its longrope_frequency_update (length > original_max); moving "
                           "the switch would mean editing that function, and changing original_max also changes the "
                           "attention factor",
        "norm_dtype": "transformers' RMSNorm forward hard-codes its upcast (x.float()); changing where it rounds would mean "
                      "re-implementing the norm, which runners never do",
    }

    # module swaps and function wrappers (see _apply_toggles): a sweep switches them on the loaded model
    live_toggles = frozenset({"bos", "gelu", "query_scale", "rope_dtype", "rope_positions", "rope_pairing", "embed_scale_dtype"})
    attn_implementation = "eager"  # transformers' attention backend (hf+sdpa, hf+flex: implementations/hf_variants.py)

    def __init__(self, *args, config_overrides: dict | None = None, device_map: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.device_map = device_map  # "auto": accelerate spreads the model over GPUs, CPU and disk (offload)
        softcaps = {"attn_softcap", "final_softcap"} & set(self.toggles)
        if softcaps and self.spec.family not in ("gemma2", "gemma3"):
            from bughunt.toggles import changed

            if softcaps & set(changed(self.spec, self.toggles)):
                raise BughuntError(f"implementation 'hf' cannot apply {', '.join(sorted(softcaps))} to {self.spec.family}: "
                                   "its transformers modeling code has no soft-cap (only gemma2 and gemma3 read the fields).")
        self.config_overrides = dict(config_overrides or {})
        self.model = None
        self._offload = None
        self._undo: list = []

    def _open(self) -> None:
        import torch
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BughuntError("--device cuda was asked for, but torch sees no CUDA device here. Use --device cpu.")
        config = transformers.AutoConfig.from_pretrained(self.checkpoint)
        for key, value in {**self._toggle_config(config), **self.config_overrides}.items():
            setattr(config, key, value)
        dtype = getattr(torch, TORCH_DTYPES[self.dtype])
        # Straight onto the device, shard by shard: no full CPU copy before .to(cuda), and a bf16 checkpoint asked
        # for at fp32 is converted tensor by tensor. device_map="auto" lets accelerate offload what does not fit.
        placement: dict = {"device_map": self.device_map or self.device}
        if self.device_map == "auto":
            import psutil

            # accelerate would otherwise fill all of the available RAM with layers before it offloads any to disk;
            # leave room for the reference, the traces and the page cache that reads the offloaded weights.
            self._offload = tempfile.TemporaryDirectory(prefix="bughunt-offload-")
            from bughunt.memory import CPU_SHARE_WITH_OFFLOAD

            cpu = int(psutil.virtual_memory().available * CPU_SHARE_WITH_OFFLOAD) >> 20
            gpus = {i: torch.cuda.mem_get_info(i)[0] * 9 // 10 >> 20 for i in range(torch.cuda.device_count())} \
                if self.device == "cuda" else {}
            placement.update(offload_folder=self._offload.name, offload_state_dict=True,
                             max_memory={**{i: f"{m}MiB" for i, m in gpus.items()}, "cpu": f"{cpu}MiB"})
        try:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                self.checkpoint, config=config, dtype=dtype, attn_implementation=self.attn_implementation,
                use_safetensors=not self.allow_pickle, **placement,
            )
        except (OSError, ValueError, RuntimeError) as e:
            raise BughuntError(f"transformers could not load {self.checkpoint}: {e}") from None
        self.model.eval()
        self._apply_toggles()

    def _input_device(self):
        """Where the input ids go: the embedding's device (with a device map, not necessarily self.device)."""
        weight = self.model.get_input_embeddings().weight
        return self.device if weight.device.type == "meta" else weight.device

    # -- toggles ----------------------------------------------------------------------------------
    def _toggle_config(self, config) -> dict:
        """Toggles that are config values."""
        import copy

        t, out = self.toggles, {}
        if "sliding_window" in t:
            out["sliding_window"] = int(t["sliding_window"])
        if "attn_softcap" in t and self.spec.family in ("gemma2", "gemma3"):
            out["attn_logit_softcapping"] = None if t["attn_softcap"] == "off" else float(t["attn_softcap"])
        if "final_softcap" in t and self.spec.family in ("gemma2", "gemma3"):
            out["final_logit_softcapping"] = None if t["final_softcap"] == "off" else float(t["final_softcap"])
        if "rms_eps" in t:
            out["rms_norm_eps"] = float(t["rms_eps"])
        theta = t.get("rope_theta") or ("10000.0" if t.get("rope_theta_source") == "default" else None)
        if theta is not None:
            rp = copy.deepcopy(getattr(config, "rope_parameters", None) or {})
            nested = [v for v in rp.values() if isinstance(v, dict)]
            for d in nested or [rp]:
                d["rope_theta"] = float(theta)
            out["rope_parameters"] = rp
        return out

    def _switch_toggles(self, new: dict[str, str]) -> None:
        while self._undo:
            self._undo.pop()()
        self.toggles = new
        self._apply_toggles()

    def _apply_toggles(self) -> None:
        """Toggles applied by swapping a module attribute or wrapping a function; each records its undo."""
        import sys

        import torch
        from transformers.activations import ACT2FN

        from bughunt.toggles import _num

        t, base = self.toggles, self.model.model
        if "gelu" in t:
            act = ACT2FN["gelu" if t["gelu"] == "exact" else "gelu_pytorch_tanh"]
            for layer in base.layers:
                attr = "act_fn" if hasattr(layer.mlp, "act_fn") else "activation_fn"
                old = getattr(layer.mlp, attr)
                setattr(layer.mlp, attr, act)
                self._undo.append(lambda m=layer.mlp, a=attr, o=old: setattr(m, a, o))
        if "query_scale" in t:
            for layer in base.layers:
                old = layer.self_attn.scaling
                layer.self_attn.scaling = _num(t["query_scale"])
                self._undo.append(lambda m=layer.self_attn, o=old: setattr(m, "scaling", o))
        if t.get("rope_dtype") == "model" or t.get("rope_positions") == "model":
            rotary = base.rotary_emb
            original = rotary.forward
            round_freqs = t.get("rope_dtype") == "model"

            def rope_in_model_dtype(x, position_ids, *args, **kwargs):
                names = [n for n, _ in rotary.named_buffers() if n.endswith("inv_freq") and "original" not in n] if round_freqs else []
                saved = {n: getattr(rotary, n) for n in names}
                try:
                    for n in names:
                        setattr(rotary, n, saved[n].to(x.dtype).to(saved[n].dtype))
                    rounded = position_ids.to(x.dtype).to(position_ids.dtype)
                    return original(x, rounded, *args, **kwargs)
                finally:
                    for n in names:
                        setattr(rotary, n, saved[n])

            rotary.forward = rope_in_model_dtype
            self._undo.append(lambda: delattr(rotary, "forward"))
        if t.get("rope_pairing") == "interleaved":
            module = sys.modules[type(base.layers[0].self_attn).__module__]
            original_apply = module.apply_rotary_pos_emb

            def interleaved(q, k, cos, sin, *args, **kwargs):
                rot = cos.shape[-1]
                perm = torch.cat([torch.arange(0, rot, 2), torch.arange(1, rot, 2), torch.arange(rot, q.shape[-1])]).to(q.device)
                inverse = torch.argsort(perm)
                q2, k2 = original_apply(q[..., perm], k[..., perm], cos, sin, *args, **kwargs)
                return q2[..., inverse], k2[..., inverse]

            module.apply_rotary_pos_emb = interleaved
            self._undo.append(lambda: setattr(module, "apply_rotary_pos_emb", original_apply))
        if t.get("embed_scale_dtype") == "fp32" and self.spec.embed_scale is not None:
            embed = base.embed_tokens

            def fp32_scale(module, args, output):
                raw = torch.nn.functional.embedding(args[0], module.weight, module.padding_idx)
                return (raw.float() * float(module.scalar_embed_scale)).to(output.dtype)

            handle = embed.register_forward_hook(fp32_scale)
            self._undo.append(handle.remove)

    def modules(self) -> dict[str, object]:
        """capture point -> (module, kind) where kind is 'pre' (input of) or 'out' (output of)."""
        return decoder_points(self.model.model, self.spec, self.branches)

    def _run(self, tokens: np.ndarray, out) -> None:
        import torch

        handles = []

        def keep(name, x):  # each point leaves the device and goes to the trace (on disk) as soon as it is captured
            x = x.detach()
            out[name] = (x if x.dtype == torch.float64 else x.to(torch.float32)).cpu().numpy()

        def out_hook(name):
            def hook(module, args, output):
                keep(name, _tensor(output))
            return hook

        def pre_hook(name):
            def hook(module, args, kwargs):
                keep(name, args[0] if args else kwargs["hidden_states"])
            return hook

        undo = []
        try:
            for name, (module, kind) in self.modules().items():
                if kind == "pre":
                    handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(out_hook(name)))
            if out.inner:
                undo.append(self._capture_inner(keep, handles))
            if out.feed is not None:  # after the capture hooks: `embed` stays this model's own embedding
                for i, layer in enumerate(self.model.model.layers):
                    handles.append(layer.register_forward_pre_hook(self._feed_hook(out.feed, i), with_kwargs=True))
            ids = torch.from_numpy(tokens).to(self._input_device())
            with torch.no_grad():
                result = self.model(input_ids=ids, use_cache=False)
            keep("logits", result.logits)
        finally:
            for h in handles:
                h.remove()
            for u in undo:
                u()

    captures_inner = True
    accepts_feed = True

    def _feed_hook(self, feed, i: int):
        """A pre-hook that hands decoder layer i the feed's input to that layer, in the model's dtype (--isolate)."""
        import torch

        def hook(module, args, kwargs):
            ref = next(module.parameters())
            x = torch.from_numpy(np.array(feed(i))).to(device=ref.device, dtype=ref.dtype)
            if args:
                return (x,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}

        return hook

    def _capture_inner(self, keep, handles: list):
        """The points inside each layer, from transformers' own code path: a wrapper around the modeling module's
        eager_attention_forward sees q and k after RoPE, the probabilities and the output it returns, and (through
        torch's softmax, swapped only while the wrapped call runs) the scores it hands to the softmax, from which the
        additive mask is taken back out (masked positions hold 0, as in the reference); a pre-hook on down_proj takes
        the MLP hidden state act(gate) * up. Returns the undo of the wrapper."""
        import sys

        import torch

        base = self.model.model
        module = sys.modules[type(base.layers[0].self_attn).__module__]
        original = module.eager_attention_forward
        layer_of = {id(layer.self_attn): i for i, layer in enumerate(base.layers)}

        def eager_with_capture(attn, query, key, value, attention_mask, *args, **kwargs):
            seen, softmax = {}, torch.nn.functional.softmax

            def spy(x, *a, **k):
                seen.setdefault("scores", x)
                return softmax(x, *a, **k)

            torch.nn.functional.softmax = spy
            try:
                output, probs = original(attn, query, key, value, attention_mask, *args, **kwargs)
            finally:
                torch.nn.functional.softmax = softmax
            point = P.branch(layer_of[id(attn)], "attn")
            scores = seen["scores"]
            if attention_mask is not None:
                mask = attention_mask[..., : scores.shape[-1]]
                allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
                scores = torch.where(allowed, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
            b, _, s, _ = query.shape
            keep(point + ".q", query.transpose(1, 2))
            keep(point + ".k", key.transpose(1, 2))
            keep(point + ".scores", scores.transpose(1, 2))
            keep(point + ".probs", probs.transpose(1, 2))
            keep(point + ".out", output.reshape(b, s, -1))
            return output, probs

        for i, layer in enumerate(base.layers):
            def hidden(mod, args, i=i):
                keep(P.inner(i, "mlp", "hidden"), args[0])
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(hidden))
        module.eager_attention_forward = eager_with_capture
        return lambda: setattr(module, "eager_attention_forward", original)

    def incremental_logits(self, tokens: np.ndarray, prefill: int, decode_config: dict | None = None) -> np.ndarray:
        """Logits [batch, seq, vocab] from the KV-cache path: prefill tokens[:, :prefill] in one pass, then one token at
        a time. `decode_config` changes config values for the one-token steps only (a decode-path bug, e.g. a sliding
        window off by one that only the decoding mask uses); it is restored afterwards."""
        import torch

        ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(self._input_device())
        saved = {k: getattr(self.model.config, k) for k in (decode_config or {})}
        try:
            with torch.no_grad():
                out = self.model(input_ids=ids[:, :prefill], use_cache=True)
                cache, logits = out.past_key_values, [out.logits.float()]
                for key, value in (decode_config or {}).items():
                    setattr(self.model.config, key, value)
                for t in range(prefill, ids.shape[1]):
                    out = self.model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
                    cache = out.past_key_values
                    logits.append(out.logits.float())
        finally:
            for key, value in saved.items():
                setattr(self.model.config, key, value)
        return torch.cat(logits, dim=1).cpu().numpy()

    exposes_weights = True

    def loaded_weights(self):
        """The model's state_dict: transformers keeps HF names and nn.Linear's [out, in] layout, so no transform is
        undone. bf16 comes back as float32 (exact); a tied lm_head is yielded as transformers holds it."""
        import torch

        for name, tensor in self.model.state_dict().items():
            if tensor.device.type == "meta" or not tensor.is_floating_point():
                continue  # offloaded (device_map auto) or an integer buffer
            t = tensor.detach()
            yield name, (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy()


    def generate(self, tokens: np.ndarray, steps: int, decode_config: dict | None = None):
        """Greedy generation through transformers' own `generate` with its KV cache, exactly `steps` tokens (no stop
        at EOS). The per-step logits are those `generate` chose from (output_logits). `decode_config` changes config
        values for the one-token steps only (a wrapper on the model's forward that sets them while the cache is
        non-empty, restored after each call): a decode-path bug the prefill does not have."""
        import torch
        import transformers

        from bughunt.generation import Generation
        from bughunt.toggles import apply_to_tokens

        ids = torch.from_numpy(apply_to_tokens(np.atleast_2d(np.asarray(tokens, dtype=np.int64)), self.spec, self.toggles))
        ids = ids.to(self._input_device())
        config = transformers.GenerationConfig(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, num_beams=1,
                                               eos_token_id=None, pad_token_id=self.spec.pad_token_id if self.spec.pad_token_id is not None else 0,
                                               output_logits=True, return_dict_in_generate=True)
        model, original = self.model, self.model.forward
        if decode_config:
            def decode_only(*args, **kwargs):
                cache = kwargs.get("past_key_values")
                if cache is None or cache.get_seq_length() == 0:
                    return original(*args, **kwargs)
                saved = {k: getattr(model.config, k) for k in decode_config}
                try:
                    for key, value in decode_config.items():
                        setattr(model.config, key, value)
                    return original(*args, **kwargs)
                finally:
                    for key, value in saved.items():
                        setattr(model.config, key, value)

            model.forward = decode_only
        try:
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        finally:
            if decode_config:
                del model.forward  # the instance attribute goes; the class's forward is back
        new = out.sequences[:, ids.shape[1]:]
        if new.shape[1] != steps:
            raise BughuntError(f"transformers' generate returned {new.shape[1]} tokens where {steps} were asked for.")
        logits = torch.stack([x.float() for x in out.logits], dim=1).cpu().numpy()
        return Generation(self.label, new.cpu().numpy().astype(np.int64), logits, "transformers generate (greedy, KV cache)",
                          "the logits generate chose from")

    def forward_plain(self, tokens: np.ndarray) -> np.ndarray:
        """A forward pass with no hooks at all (for the capture-overhead benchmark and the hook tests)."""
        import torch

        with torch.no_grad():
            return self.model(input_ids=torch.from_numpy(tokens).to(self._input_device()), use_cache=False).logits.float().cpu().numpy()

    def _close(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.model = None
        if self._offload is not None:
            self._offload.cleanup()
            self._offload = None
        try:
            import torch

            if self.device == "cuda":
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def versions(self) -> dict[str, str]:
        import torch
        import transformers

        return {"torch": torch.__version__, "transformers": transformers.__version__}
