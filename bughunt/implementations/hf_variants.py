"""The other paths people run transformers through, each an implementation of its own: `hf+sdpa` (torch's
scaled_dot_product_attention), `hf+flex` (flex attention, compiled by torch on first use) and `hf+compile`
(`torch.compile` of the whole model, Inductor on CPU). Same loading, hooks and toggles as `hf` (eager); only the
attention backend or the compilation differs, so a difference from `hf` is that path's own numerics.

What transformers refuses (Gemma 2 with SDPA: its attention soft-cap has no SDPA kernel) is refused here by name,
before anything loads."""

from __future__ import annotations

import numpy as np

from bughunt.errors import BughuntError
from bughunt.implementations.hf import HFRunner, _tensor


_SDPA_REFUSALS = {"gemma2": "transformers refuses SDPA for Gemma 2 (Gemma2PreTrainedModel._supports_sdpa is False: "
                            "SDPA has no attention soft-cap, and dropping it silently was a real bug)"}


class _RefusingHFRunner(HFRunner):
    supports_device_map = False  # --device-map goes to the plain eager path only
    tokenizer_path = None  # the same tokenizer as hf, whose path is checked once
    library_gb = 1.0  # SDPA, flex and Inductor paths: counted as a full stack (bughunt/memory.py)
    # family -> why transformers refuses this path for it (checked against transformers by tests/test_hf_variants.py)
    refusals: dict[str, str] = {}

    def __init__(self, checkpoint, spec, *args, **kwargs):
        if spec.family in self.refusals:
            raise BughuntError(f"implementation '{self.name}' does not run {spec.family}: {self.refusals[spec.family]}. "
                               f"Use one of: hf, {', '.join(v for v in ('hf+sdpa', 'hf+flex', 'hf+compile') if v != self.name)}.")
        super().__init__(checkpoint, spec, *args, **kwargs)


class HFSdpaRunner(_RefusingHFRunner):
    name = "hf+sdpa"
    attn_implementation = "sdpa"
    refusals = _SDPA_REFUSALS
    families = tuple(f for f in HFRunner.families if f not in _SDPA_REFUSALS)


class HFFlexRunner(_RefusingHFRunner):
    name = "hf+flex"
    attn_implementation = "flex_attention"


class HFCompileRunner(HFRunner):
    """`torch.compile(model)` with transformers' eager attention, so the only change from `hf` is compilation.

    Capture: the forward hooks are registered once, before the first compiled call, and stay for the runner's life.
    Each hook only keeps its tensor in a dict, which Dynamo traces as a side effect, so the capture points become
    outputs of one graph (no graph break per hook); they go to the trace after the forward. Hooks registered per run
    (as `hf` does) would be invisible: Dynamo does not guard on module hooks (skip_nnmodule_hook_guards) and would
    keep running the graph compiled without them."""

    name = "hf+compile"
    install_hint = "pip install -e .   (bughunt's core; Inductor on CPU also needs a C++ compiler: apt-get install g++)"  # how to install its stack (bughunt implementations prints it)
    devices = ("cpu", "cuda")
    supports_device_map = False
    tokenizer_path = None  # the same tokenizer as hf, whose path is checked once
    library_gb = 1.0  # SDPA, flex and Inductor paths: counted as a full stack (bughunt/memory.py)

    def _open(self) -> None:
        import torch

        super()._open()
        import torch._dynamo

        # every toggle setting of a sweep is a recompile; past the limit Dynamo would silently fall back to eager
        # and the trace would be labelled compiled without being so: fail instead.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.fail_on_recompile_limit_hit = True
        self._captured: dict[str, object] = {}
        self._handles = []
        for name, (module, kind) in self.modules().items():
            if kind == "pre":
                hook = (lambda n: lambda m, args, kwargs: self._captured.__setitem__(
                    n, (args[0] if args else kwargs["hidden_states"]).detach()))(name)
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                hook = (lambda n: lambda m, args, output: self._captured.__setitem__(n, _tensor(output).detach()))(name)
                self._handles.append(module.register_forward_hook(hook))
        torch._dynamo.reset()  # a fresh cache per loaded model (a worker may have compiled another checkpoint before)
        self.model.compile()
        self.compiled_runs = 0

    def _run(self, tokens: np.ndarray, out) -> None:
        import time

        import torch
        from torch._dynamo.utils import counters

        self._captured.clear()
        breaks = sum(counters["graph_break"].values())
        t = time.perf_counter()
        with torch.no_grad():
            result = self.model(input_ids=torch.from_numpy(tokens).to(self._input_device()), use_cache=False)
        self.last_call_s = time.perf_counter() - t
        self.last_graph_breaks = sum(counters["graph_break"].values()) - breaks
        missing = [p for p in self.modules() if p not in self._captured]
        if missing:
            raise RuntimeError(f"the compiled model did not run the capture hooks for {missing[:3]}")
        for name in self.modules():  # in capture order
            x = self._captured[name]
            out[name] = (x if x.dtype == torch.float64 else x.to(torch.float32)).cpu().numpy()
        self._captured.clear()
        out["logits"] = result.logits.float().cpu().numpy()
        self.compiled_runs += 1

    def finish(self, out, tokens, seconds, **timings):
        return super().finish(out, tokens, seconds, compiled_call_s=self.last_call_s,
                              graph_breaks=float(self.last_graph_breaks), **timings)

    def _close(self) -> None:
        for h in getattr(self, "_handles", []):
            h.remove()
        self._handles = []
        super()._close()
