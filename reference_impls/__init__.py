"""Float64 numpy forward passes written from the papers and configs, one file per family.

Each `forward(weights, spec, tokens, policy)` returns the capture points as float64 arrays:
`embed`, `layer.{i}`, `layer.{i}.attn`, `layer.{i}.mlp`, `final_norm`, `logits`.
"""

from reference_impls._numerics import Policy

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


def forward(weights, spec, tokens, policy: Policy | None = None):
    """Run the reference forward pass for spec.family."""
    import importlib

    module = importlib.import_module(FORWARDS[spec.family])
    return module.forward(weights, spec, tokens, policy or Policy())


__all__ = ["Policy", "forward", "FORWARDS"]
