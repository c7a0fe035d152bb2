"""Float64 numpy forward passes written from the papers and configs, one file per family.

Each `forward(weights, spec, tokens, policy, out)` writes the capture points into `out` as float64 arrays, in
forward order, as soon as each is computed: `embed`, `layer.{i}`, `layer.{i}.attn`, `layer.{i}.mlp`,
`final_norm`, `logits`. `weights` maps names to arrays in their stored dtype (memory-mapped from the
checkpoint); each is converted to float64 only while its layer runs.
"""

from reference_impls._capture import Points
from reference_impls._numerics import Policy
from reference_impls._weights import Shared

FORWARDS = {
    "gemma": "reference_impls.gemma",
    "gemma2": "reference_impls.gemma2",
    "gemma3": "reference_impls.gemma3",
    "llama": "reference_impls.llama",
    "mistral": "reference_impls.llama",
    "qwen2": "reference_impls.llama",
    "qwen3": "reference_impls.llama",
    "phi3": "reference_impls.phi3",
}


def forward(weights, spec, tokens, policy: Policy | None = None, out=None):
    """Run the reference forward pass for spec.family. `out` receives the capture points (a bughunt TraceWriter
    streams them to disk); by default they are kept in memory and returned."""
    return forward_many(weights, [(spec, tokens, policy, out)])[0]


def steps(spec) -> int:
    """How many steps (layers, then vocabulary chunks of the logits) one forward pass takes: for progress lines."""
    from reference_impls._numerics import CHUNK_BYTES

    chunk = max(1, CHUNK_BYTES // (8 * spec.hidden_size))
    return spec.num_layers + -(-spec.vocab_size // chunk)


def forward_many(weights, runs, on_step=None, seconds: list | None = None, layers: int | None = None) -> list:
    """Several forward passes over the same weights, stepped side by side a layer (and a vocabulary chunk) at a time,
    so each tensor is read and converted to float64 once for all of them: runs are (spec, tokens, policy, out)
    tuples that may differ in everything but the family and the sizes (toggle settings, emulated dtype, input).
    `on_step()` is called after each step (a layer, or a chunk of the logits). Returns the `out` of each run;
    `seconds`, if given a list, receives each run's own time (a shared weight is charged to the first run that
    converts it). With `layers`, every pass stops after that many decoder layers (a screening pass: the points of the
    embedding and those layers, no logits)."""
    import importlib
    import time

    shared = Shared(weights) if len(runs) > 1 else weights
    outs, passes = [], []
    for spec, tokens, policy, out in runs:
        module = importlib.import_module(FORWARDS[spec.family])
        outs.append(Points() if out is None else out)
        passes.append(module.forward(shared, spec, tokens, policy or Policy(), outs[-1]))
    spent = [0.0] * len(passes)
    live = list(range(len(passes)))
    step = 0
    while live:
        if layers is not None and step >= layers:
            for i in live:
                passes[i].close()
            break
        step += 1
        for i in list(live):
            t = time.perf_counter()
            done = next(passes[i], StopIteration) is StopIteration
            spent[i] += time.perf_counter() - t
            if done:
                live.remove(i)
        if isinstance(shared, Shared):
            shared.cache.clear()  # every pass has moved on: this step's tensors are no longer needed
        if on_step is not None and live:
            on_step()
    if seconds is not None:
        seconds[:] = spent
    return outs


__all__ = ["Points", "Policy", "forward", "forward_many", "steps", "FORWARDS"]
