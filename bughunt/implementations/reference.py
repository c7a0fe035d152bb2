"""The `reference` implementation: the float64 numpy forward passes in reference_impls/. At fp64 it
rounds nowhere; at another dtype it emulates that dtype's rounding policy step by step. Weights are
memory-mapped and converted one tensor at a time; capture points stream into the trace as they are made."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bughunt.implementations import QUANT_FTYPES
from bughunt.checkpoint import load_weights
from bughunt.errors import BughuntError
from bughunt.implementations.base import Runner
from bughunt.toggles import TOGGLES
from bughunt.trace import Trace


class ReferenceRunner(Runner):
    name = "reference"
    install_hint = "pip install -e .   (bughunt's core)"  # how to install its stack (bughunt implementations prints it)
    library_gb, streams_layers = 0.25, True  # numpy; one layer's weights in float64 at a time (bughunt/memory.py)
    families = ("gemma", "gemma2", "gemma3", "llama", "mistral", "phi3", "qwen2", "qwen3")
    dtypes = ("fp64", "fp32", "bf16", "fp16", *QUANT_FTYPES)  # quantized: float64 on llama.cpp's quantized weights
    devices = ("cpu", "cuda")  # numpy runs on the host whatever the device asked; the trace says so
    # every toggle but a library's runtime settings: the Policy's numerics choices, the Spec's values, bos
    toggle_support = {name: None for name, toggle in TOGGLES.items() if not toggle.setting}
    applies_field_hypotheses = True  # field:<path> toggles: the spec as an implementation that reads the config that way

    def __init__(self, *args, policy=None, quantized_from: str | Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.quantized_from = quantized_from  # a quantization floor at this GGUF file's types (default: llama.cpp's own)
        from reference_impls import Policy

        from bughunt.toggles import POLICY_TOGGLES, apply_to_spec

        policy_fields = {k: v for k, v in self.toggles.items() if k in POLICY_TOGGLES}
        self.quantized = self.dtype if self.dtype in QUANT_FTYPES else None
        self.policy = Policy(**{**(policy or Policy()).__dict__, **policy_fields, "dtype": "fp64" if self.quantized else self.dtype})
        self.config_spec = self.spec  # what the checkpoint holds: its weights are loaded and checked against this
        self.spec = apply_to_spec(self.spec, self.toggles)
        from bughunt.spec import SUPPORTED_ROPE_TYPES, rope_problems

        problems = rope_problems(self.spec)
        if problems:
            raise BughuntError(f"the reference cannot compute this config's RoPE: {problems[0]}. Fix the config (bughunt lint names it).")
        for kind, rope in self.spec.rope.items():
            if rope.type not in SUPPORTED_ROPE_TYPES:
                raise BughuntError(f"the reference does not implement rope_type '{rope.type}' yet (supports: {', '.join(SUPPORTED_ROPE_TYPES)}).")

    trace_dtype = np.float64
    captures_inner = True  # reference_impls write attn.q/k/scores/probs/out and mlp.hidden when asked
    accepts_feed = True  # reference_impls._capture.layer_input

    def _open(self) -> None:
        self.weights = load_weights(self.checkpoint, self.config_spec, self.allow_pickle)  # memory-mapped: nothing read yet
        if self.quantized:  # the quantization noise floor: dequantize(quantize(w)) as llama.cpp's GGUF types say
            from bughunt.implementations.llamacpp import gguf_file
            from bughunt.implementations.quantized_weights import QuantizedWeights

            source = Path(self.quantized_from) if self.quantized_from else gguf_file(self.checkpoint, self.quantized)[0]
            self.weights = QuantizedWeights(self.weights, self.config_spec, source)

    def _run(self, tokens: np.ndarray, out) -> None:
        from reference_impls import forward

        forward(self.weights, self.spec, tokens, self.policy, out)

    def _close(self) -> None:
        self.weights = None

    def finish(self, out, tokens, seconds, **timings):
        """A quantization floor's trace says what it emulated: how each weight was made, and the activation type each
        weight type's products see (a weight type with none is emulated on its weights alone)."""
        trace = super().finish(out, tokens, seconds, **timings)
        if self.quantized and hasattr(self.weights, "emulation"):
            trace.meta["quantization"] = self.weights.emulation()
            if trace.stem is not None:
                trace.save_meta()
        return trace

    def versions(self) -> dict[str, str]:
        import ml_dtypes

        return {"numpy": np.__version__, "ml_dtypes": ml_dtypes.__version__, "policy": repr(self.policy)}


def run_together(runners: list[ReferenceRunner], tokens: np.ndarray, stems: list[Path | None], on_step=None,
                 inner: bool = False, layers: int | None = None) -> list[Trace]:
    """Run several open reference runners of one checkpoint (different toggles or emulated dtypes) side by side, a
    layer at a time, so each weight is read and converted to float64 once for all of them: a search over K
    settings, or the float64 pass with its noise-floor pass, costs one read of the model instead of K. With `inner`,
    every pass also writes the points inside each layer. With `layers`, each pass stops after that many decoder layers
    (the search's screening passes)."""
    from reference_impls import forward_many

    prepared = [r.prepare(tokens, stem) for r, stem in zip(runners, stems)]
    for _, out in prepared:
        out.inner = inner
    t = time.perf_counter()
    each: list[float] = []
    try:
        forward_many(runners[0].weights, [(r.spec, ids, r.policy, out) for r, (ids, out) in zip(runners, prepared)], on_step, each,
                     layers)
    except BaseException:
        for _, out in prepared:
            out.abort()
        raise
    seconds = time.perf_counter() - t
    return [r.finish(out, ids, own, together_s=seconds, together_with=len(runners))
            for r, (ids, out), own in zip(runners, prepared, each)]
