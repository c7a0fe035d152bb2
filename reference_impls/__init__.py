"""Float64 numpy forward passes written from the papers and configs, one file per family.

Each `forward(weights, spec, tokens, policy, out)` writes the capture points into `out` as float64 arrays, in
forward order, as soon as each is computed: `embed`, `layer.{i}`, `layer.{i}.attn`, `layer.{i}.mlp`,
`final_norm`, `logits`. `weights` maps names to arrays in their stored dtype (memory-mapped from the
checkpoint); each is converted to float64 only while its layer runs.
"""

from reference_impls._numerics import Points, Policy

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
    import importlib

    module = importlib.import_module(FORWARDS[spec.family])
    out = Points() if out is None else out
    module.forward(weights, spec, tokens, policy or Policy(), out)
    return out


__all__ = ["Points", "Policy", "forward", "FORWARDS"]
