"""Toggles: each one moves the trace, HF applies it exactly as the reference does, wrappers are undone, and a toggle
an implementation cannot apply is a clear error. The search over toggles: tests/test_sweep.py."""

import sys

import numpy as np
import pytest

from bughunt.floors import noise_floor
from bughunt.errors import BughuntError
from bughunt.implementations.hf import HFRunner
from bughunt.implementations.reference import ReferenceRunner
from bughunt.metrics import compare_traces
from bughunt.spec import load_spec
from bughunt.tiny import TINY_FAMILIES
from bughunt.toggles import TOGGLES, defaults

DTYPE_TOGGLES = ("rope_dtype", "norm_dtype", "embed_scale_dtype", "rope_positions", "attn_dtype", "logits_dtype")  # only matter below fp32
LONG = ("rope_positions",)  # only matter past position 256, where bf16 stops representing every integer


def other_value(name, spec):
    default = defaults(spec)[name]
    t = TOGGLES[name]
    if t.kind == "choice":
        return next(v for v in t.values if v != default)
    if name == "sliding_window":
        return str(spec.sliding_window - 1)
    if name in ("attn_softcap", "final_softcap"):
        return "off" if default != "off" else "5.0"
    if name == "query_scale":
        return f"rsqrt:{spec.head_dim * 4}"
    if name == "rope_theta":
        return "1000.0"
    if name == "rms_eps":
        return "1e-05"
    if name == "rope_positions":
        return "model"
    if name == "rope_theta_source":
        return "default"
    raise AssertionError(name)


def _tiny_spec(family):
    from bughunt.spec import spec_from_config
    from bughunt.tiny import tiny_config_dict

    model_type = {"gemma3": "gemma3_text"}.get(family, family)
    return spec_from_config({**tiny_config_dict(family)[1], "model_type": model_type})


# Every (family, toggle) pair where the toggle means something for that family (runtime settings have no reference side).
CASES = [(f, n) for f in TINY_FAMILIES for n in TOGGLES if TOGGLES[n].applies(_tiny_spec(f)) and not TOGGLES[n].setting]


@pytest.fixture(scope="module")
def floors(tiny, tokens):
    return {f: noise_floor(tiny[f], load_spec(tiny[f]), "fp32", tokens) for f in TINY_FAMILIES}


@pytest.mark.parametrize("family, name", CASES)
def test_every_toggle_moves_the_trace_well_above_the_fp32_noise_floor(family, name, tiny, tokens, floors):
    spec = load_spec(tiny[family])
    value = other_value(name, spec)
    dtype = "bf16" if name in DTYPE_TOGGLES else "fp32"
    ids = np.random.default_rng(0).integers(3, 256, size=(1, 300)) if name in LONG else tokens
    with ReferenceRunner(tiny[family], spec, dtype) as r:
        base = r.run(ids)
    with ReferenceRunner(tiny[family], spec, dtype, toggles={name: value}) as r:
        moved = r.run(ids)
    points = compare_traces(moved, base)
    floor = floors[family]["points"] if name not in LONG else {p: {"floor_rel_l2": 2.0**-24} for p in base.arrays}
    ratio = max(p["rel_l2"] / floor[p["point"]]["floor_rel_l2"] for p in points)
    assert ratio > 10, f"{family} {name}={value} moves the trace only {ratio:.1f}x the fp32 floor"


HF_CASES = [
    ("gemma", "fp32", {"gelu": "exact"}), ("gemma2", "fp32", {"attn_softcap": "off"}), ("gemma2", "fp32", {"query_scale": "rsqrt:16"}),
    ("gemma3", "fp32", {"sliding_window": "3"}), ("mistral", "fp32", {"sliding_window": "5"}), ("phi3", "fp32", {"sliding_window": "5"}),
    ("llama", "fp32", {"rms_eps": "1e-5"}), ("llama", "fp32", {"rope_theta": "10000"}), ("gemma3", "fp32", {"rope_theta": "10000"}),
    ("qwen2", "fp32", {"rope_pairing": "interleaved"}), ("phi3", "fp32", {"rope_pairing": "interleaved"}),
    ("gemma", "fp32", {"bos": "off"}), ("gemma2", "fp32", {"final_softcap": "off", "gelu": "exact"}),
    ("qwen3", "fp32", {"query_scale": "0.1"}), ("llama", "fp32", {"rope_theta_source": "default"}),
    ("gemma", "bf16", {"embed_scale_dtype": "fp32"}), ("llama", "bf16", {"rope_dtype": "model"}), ("gemma2", "bf16", {"rope_dtype": "model"}),
]


@pytest.mark.parametrize("family, dtype, toggles", HF_CASES, ids=[f"{f}-{d}-{'-'.join(t)}" for f, d, t in HF_CASES])
def test_hf_applies_each_toggle_exactly_as_the_reference_does(family, dtype, toggles, tiny, tokens):
    spec = load_spec(tiny[family])
    with HFRunner(tiny[family], spec, dtype, toggles=toggles) as h:
        hf = h.run(tokens)
        again = h.run(tokens)
    with ReferenceRunner(tiny[family], spec, dtype, toggles=toggles) as r:
        ref = r.run(tokens)
    with ReferenceRunner(tiny[family], spec, dtype) as r:
        untoggled = r.run(tokens)
    same = max(p["rel_l2"] for p in compare_traces(hf, ref))
    moved = max(p["rel_l2"] for p in compare_traces(ref, untoggled))
    assert same <= (1e-5 if dtype == "fp32" else 2e-3), same
    assert moved > 10 * max(same, 1e-7)
    for k in hf.arrays:  # the same toggles twice give identical traces
        np.testing.assert_array_equal(hf.arrays[k], again.arrays[k])


def test_hf_wrappers_are_undone_on_close(tiny, tokens):
    spec = load_spec(tiny["llama"])
    module = sys.modules["transformers.models.llama.modeling_llama"]
    original = module.apply_rotary_pos_emb
    with HFRunner(tiny["llama"], spec, "bf16", toggles={"rope_pairing": "interleaved", "rope_dtype": "model", "rms_eps": "1e-5"}) as h:
        assert module.apply_rotary_pos_emb is not original
        model = h.model
        h.run(tokens)
    assert module.apply_rotary_pos_emb is original
    assert "forward" not in vars(model.model.rotary_emb)
    with HFRunner(tiny["llama"], spec, "fp32") as plain, ReferenceRunner(tiny["llama"], spec, "fp64") as ref:
        assert max(p["rel_l2"] for p in compare_traces(plain.run(tokens), ref.run(tokens))) < 1e-5


@pytest.mark.parametrize("family, toggles, message", [
    ("llama", {"norm_dtype": "model"}, "hard-codes its upcast"),
    ("llama", {"attn_softcap": "30.0"}, "has no soft-cap"),
    ("llama", {"sliding_window": "4"}, "does not apply"),
    ("gemma", {"gelu": "sigmoid"}, "allowed values"),
    ("gemma", {"nonsense": "1"}, "unknown toggle"),
])
def test_toggles_an_implementation_cannot_apply_are_clear_errors(family, toggles, message, tiny):
    with pytest.raises(BughuntError, match=message):
        HFRunner(tiny[family], load_spec(tiny[family]), "fp32", toggles=toggles)
