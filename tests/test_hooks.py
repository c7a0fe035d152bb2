"""The HF runner's forward hooks capture what transformers itself reports, and leave nothing behind."""

import numpy as np
import pytest
import torch

from bughunt.implementations.hf import HFRunner
from bughunt.spec import load_spec


def all_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", ["gemma2", "llama", "phi3"])
def test_hooks_capture_exactly_what_output_hidden_states_gives(family, tiny, tokens):
    spec = load_spec(tiny[family])
    with HFRunner(tiny[family], spec, "fp32") as runner:
        trace = runner.run(tokens)
        with torch.no_grad():
            out = runner.model(input_ids=torch.from_numpy(tokens), output_hidden_states=True, use_cache=False)
        hidden = [h.float().numpy() for h in out.hidden_states]
        np.testing.assert_array_equal(trace.arrays["logits"], out.logits.float().numpy())
    # transformers 5 reports: [embed, layer.0, ..., layer.{N-2}, final_norm] (the last entry is after the final norm).
    n = spec.num_layers
    assert len(hidden) == n + 1
    overlap = ["embed"] + [f"layer.{i}" for i in range(n - 1)] + ["final_norm"]
    for name, h in zip(overlap, hidden):
        np.testing.assert_array_equal(trace.arrays[name], h, err_msg=name)


def test_hooks_are_removed_after_each_run_and_after_a_failing_run(tiny, tokens):
    spec = load_spec(tiny["llama"])
    with HFRunner(tiny["llama"], spec, "fp32") as runner:
        before = all_hooks(runner.model)
        runner.run(tokens)
        assert all_hooks(runner.model) == before
        bad = np.array([[1, 2, 3]])
        original = runner.model.model.layers[1].forward

        def boom(*args, **kwargs):
            raise RuntimeError("planted failure inside the model")

        runner.model.model.layers[1].forward = boom
        with pytest.raises(RuntimeError, match="planted failure"):
            runner.run(bad)
        runner.model.model.layers[1].forward = original
        assert all_hooks(runner.model) == before
        # and the same input twice gives bit-identical traces
        a, b = runner.run(tokens), runner.run(tokens)
        for k in a.arrays:
            np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
