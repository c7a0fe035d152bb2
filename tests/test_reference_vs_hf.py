"""HF transformers against the float64 reference on the tiny checkpoint of every family."""

import numpy as np
import pytest

from bughunt.implementations.hf import HFRunner
from bughunt.implementations.reference import ReferenceRunner
from bughunt.metrics import compare_traces
from bughunt.spec import load_spec
from bughunt.tiny import TINY_FAMILIES


def run(cls, checkpoint, dtype, tokens):
    with cls(checkpoint, load_spec(checkpoint), dtype) as runner:
        return runner.run(tokens)


@pytest.fixture(scope="module")
def fp64(tiny, tokens):
    return {f: run(ReferenceRunner, tiny[f], "fp64", tokens) for f in TINY_FAMILIES}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_hf_fp32_matches_float64_reference_at_every_capture_point(family, tiny, tokens, fp64):
    hf = run(HFRunner, tiny[family], "fp32", tokens)
    points = compare_traces(hf, fp64[family])
    spec = load_spec(tiny[family])
    assert [p["point"] for p in points] == fp64[family].points()
    assert len(points) == 3 + 3 * spec.num_layers  # embed, 3 per layer, final_norm, logits
    worst = max(points, key=lambda p: p["rel_l2"])
    print(f"{family}: HF fp32 vs float64 reference, max rel L2 {worst['rel_l2']:.2e} at {worst['point']}")
    for p in points:
        assert p["rel_l2"] <= 1e-5, p
    logits = points[-1]
    assert logits["top1"] == 1.0


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_hf_bf16_is_finite_worse_than_fp32_and_matched_by_the_emulating_reference(family, tiny, tokens, fp64):
    hf32 = run(HFRunner, tiny[family], "fp32", tokens)
    hf16 = run(HFRunner, tiny[family], "bf16", tokens)
    emulated = run(ReferenceRunner, tiny[family], "bf16", tokens)
    for name, arr in hf16.arrays.items():
        assert np.isfinite(arr).all(), name

    def mean_rel(a, b):
        return float(np.mean([p["rel_l2"] for p in compare_traces(a, b)]))

    err32, err16 = mean_rel(hf32, fp64[family]), mean_rel(hf16, fp64[family])
    err16_emulated = mean_rel(hf16, emulated)
    ratio = err16 / max(err16_emulated, 1e-12)
    print(f"{family}: bf16 vs float64 {err16:.2e}, vs emulated-bf16 reference {err16_emulated:.2e} "
          f"(closer by {'exact' if err16_emulated == 0 else f'{ratio:.1f}x'}); fp32 {err32:.2e}")
    assert err16 > 100 * err32
    # The reference emulating HF's bf16 rounding policy lands much closer to HF bf16 than float64 does.
    assert err16_emulated < err16 / 3
