"""The `mlx` implementation (mlx-lm on MLX's CPU backend) on every tiny family at fp32. Where it departs from the
reference, the test pins the cause: the reference with the toggle that reproduces mlx-lm's choice is at the floor."""

import pytest

import bughunt
from bughunt.implementations import available

pytestmark = pytest.mark.skipif(not available("mlx"), reason="mlx and mlx-lm are not installed (requirements/mlx.txt)")

# family -> the reference setting that mlx-lm 0.32.2 behaves like (None: the plain reference)
EXPLAINED = {
    "qwen3": None,
    "llama": "rope_theta_source=default",  # reads top-level rope_theta only; transformers 5 writes rope_parameters
    "mistral": "sliding_window=4096",  # its llama file applies no sliding window without layer_types
    "gemma2": "sliding_window=4096",  # no sliding window at all
    "gemma": "gelu=exact",  # exact GELU whatever hidden_act says (gelu_pytorch_tanh)
}


def _run(tiny, tokens, family, reference="reference"):
    return bughunt.compare(tiny[family], ["mlx", reference], reference=reference, dtype="fp32", tokens=tokens,
                           render=False, isolate=False)


@pytest.mark.parametrize("family", sorted(EXPLAINED))
def test_mlx_matches_the_reference_or_the_named_choice(tiny, tokens, family):
    setting = EXPLAINED[family]
    plain = _run(tiny, tokens, family)
    if setting is None:
        assert plain.first_above_floor("mlx") is None, plain.comparison("mlx")["summary"]
        return
    assert plain.first_above_floor("mlx") is not None  # a finding against the checkpoint's own config
    explained = _run(tiny, tokens, family, f"reference[{setting}]")
    assert explained.first_above_floor("mlx") is None, explained.comparison("mlx")["summary"]


def test_mlx_phi3_departs_at_the_first_attention(tiny, tokens):
    result = _run(tiny, tokens, "phi3")
    assert result.first_above_floor("mlx") == "layer.0.attn"


@pytest.mark.parametrize("family,message", [("qwen2", "Expected shape"), ("gemma3", "hard-codes a global layer")])
def test_mlx_cannot_load_these_tiny_checkpoints(tiny, tokens, family, message):
    result = _run(tiny, tokens, family)
    entry = next(e for e in result.data["implementations"] if e["label"] == "mlx")
    assert entry["status"] != "ok" and message in entry["error"]
