"""Tiny checkpoints are deterministic in their seed and are real HF checkpoints."""

import numpy as np

from bughunt.checkpoint import load_weights
from bughunt.tiny import make_tiny_checkpoint


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tmp_path):
    a = load_weights(make_tiny_checkpoint("gemma2", tmp_path / "a", seed=3))
    b = load_weights(make_tiny_checkpoint("gemma2", tmp_path / "b", seed=3))
    c = load_weights(make_tiny_checkpoint("gemma2", tmp_path / "c", seed=4))
    assert a.keys() == b.keys() == c.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])


def test_tiny_checkpoint_loads_in_transformers_with_its_config(tiny):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny["gemma3"])
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.sliding_window == 4
