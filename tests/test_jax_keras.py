"""DeepMind's `gemma` (JAX) and keras-hub (JAX and torch backends) against the float64 reference on the tiny
checkpoints of every family they support. Where they depart, the test pins where and (via the toggle search or a
checkpoint that removes the cause) why: these are findings about the libraries, not adapter bugs."""

import importlib.util

import pytest

from bughunt.comparison import compare
from bughunt.sweep import sweep
from bughunt.tiny import make_tiny_checkpoint
from bughunt.worker import WorkerPool

HAVE_GEMMA = all(importlib.util.find_spec(m) for m in ("jax", "flax", "gemma", "kauldron"))
HAVE_KERAS = all(importlib.util.find_spec(m) for m in ("keras", "keras_hub", "jax"))
needs_gemma = pytest.mark.skipif(not HAVE_GEMMA, reason="DeepMind gemma stack not installed (requirements/jax.txt)")
needs_keras = pytest.mark.skipif(not HAVE_KERAS, reason="keras-hub stack not installed (requirements/keras.txt)")
KERAS = ["keras-jax", "keras-torch"]


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(timeout=300) as p:  # one worker per implementation for the whole module
        yield p


def run(checkpoint, impls, pool, dtype="fp32"):
    return compare(checkpoint, impls + ["reference"], dtype=dtype, pool=pool)


@needs_gemma
@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_deepmind_gemma_is_at_the_fp32_floor(family, tiny, pool):
    result = run(tiny[family], ["deepmind"], pool)
    entry = next(e for e in result.data["implementations"] if e["label"] == "deepmind")
    assert entry["status"] == "ok", entry["error"]
    assert result.first_above_floor("deepmind") is None
    assert result.comparison("deepmind")["summary"]["logits_top1"] == 1.0


@needs_gemma
def test_deepmind_measures_what_the_library_cannot_represent(tmp_path, pool):
    ck = make_tiny_checkpoint("gemma2", tmp_path / "eps", config_overrides={"rms_norm_eps": 1e-2})
    result = run(ck, ["deepmind"], pool)
    entry = next(e for e in result.data["implementations"] if e["label"] == "deepmind")
    assert entry["status"] == "ok"  # run with the library's own epsilon, and measured
    cause = "the library fixes rms_norm_eps at 1e-06; the checkpoint says 0.01"
    assert entry["meta"]["cannot_represent"] == [cause]
    found = next(f for f in result.findings if f["kind"] == "unrepresentable")
    assert found["message"].startswith(f"deepmind cannot represent this checkpoint and ran with the library's own values: {cause}; "
                                       "departs at layer.0")
    assert result.first_above_floor("deepmind") == found["point"] == "layer.0"  # the library exposes no branch points
    llama = run(make_tiny_checkpoint("llama", tmp_path / "llama"), ["deepmind"], pool)
    assert "does not support family 'llama'" in llama.data["implementations"][0]["error"]


@needs_gemma
def test_deepmind_bf16_is_explained_by_norms_in_the_model_dtype(tiny):
    # The library's RMSNorm computes in the activation dtype; HF upcasts to fp32. The search names it.
    s = sweep(tiny["gemma3"], impl="deepmind", dtype="bf16", mode="search").data["sweep"]["search"]
    assert s["best"] == {"norm_dtype": "model"} and s["at_floor"]


@pytest.mark.slow
@needs_keras
@pytest.mark.parametrize("impl", KERAS)
def test_keras_gemma_is_at_the_fp32_floor_on_both_backends(impl, tiny, pool):
    result = run(tiny["gemma"], [impl], pool)
    assert result.first_above_floor(impl) is None
    assert result.data["implementations"][0]["meta"]["versions"]["backend"] == impl.split("-")[1]


@pytest.mark.slow
@needs_keras
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_keras_ignores_an_explicit_head_dim_and_matches_when_it_equals_hidden_over_heads(family, tiny, tmp_path, pool):
    failed = run(tiny[family], ["keras-jax"], pool)  # tiny: head_dim 16, hidden/heads 12
    entry = failed.data["implementations"][0]
    assert entry["status"] == "failed" and "cannot reshape" in entry["error"]
    ck = make_tiny_checkpoint(family, tmp_path / family, config_overrides={"head_dim": 12})
    result = run(ck, KERAS, pool)
    for impl in KERAS:
        assert result.first_above_floor(impl) is None


@pytest.mark.slow
@needs_keras
def test_keras_gemma2_ignores_query_pre_attn_scalar_and_the_search_says_so(tiny):
    result = sweep(tiny["gemma2"], impl="keras-jax", mode="search")
    s = result.data["sweep"]["search"]
    assert result.comparisons[0]["first_above_floor"] == "layer.0"
    assert s["best"] == {"field:query_pre_attn_scalar": "ignored"} and s["at_floor"]  # head_dim^-0.5 instead of 24^-0.5
    assert {"query_scale": "rsqrt:16"} in s["equivalent"]


@pytest.mark.slow
@needs_keras
def test_keras_gemma3_ignores_query_pre_attn_scalar_and_layer_types(tiny):
    s = sweep(tiny["gemma3"], impl="keras-torch", mode="search").data["sweep"]["search"]
    # keras-hub's Gemma3Backbone hard-codes a 5:1 local:global pattern: the tiny model's 4 layers are all local there,
    # so its global layer 3 (RoPE 1M, linear factor 2) runs as a local one. The search names both ignored fields.
    assert s["best"] == {"field:layer_types": "ignored", "field:query_pre_attn_scalar": "ignored"}
    assert s["at_floor"] and "as if it ignored layer_types" in s["diagnosis"]


@needs_keras
def test_keras_mistral_rounds_weights_to_fp16(tiny, tmp_path, pool):
    departed = run(tiny["mistral"], ["keras-jax"], pool)
    assert departed.first_above_floor("keras-jax") == "embed"
    ck = make_tiny_checkpoint("mistral", tmp_path / "fp16", dtype="float16")  # weights fp16 already: the cast is lossless
    assert run(ck, ["keras-jax"], pool).first_above_floor("keras-jax") is None


@needs_keras
def test_keras_backends_agree_with_each_other(tiny, pool):
    result = compare(tiny["gemma"], ["keras-jax", "keras-torch"], reference="keras-jax", pool=pool)
    assert result.comparison("keras-torch")["summary"]["max_rel_l2"] < 1e-5
