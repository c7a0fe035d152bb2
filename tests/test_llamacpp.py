"""llama.cpp as an implementation: the real converter, llama.cpp's own graph captured at every layer, judged against
the float64 reference. Where llama.cpp implements a tiny config as the reference does, it sits at the fp32 floor;
where it does not, the departure is a finding at the capture point where it starts (never patched in the adapter)."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (`make llamacpp`)")

from bughunt.comparison import compare  # noqa: E402
from bughunt.implementations.gguf_convert import convert_many  # noqa: E402
from bughunt.implementations.llamacpp import FAMILY_ARCH, LlamaCppRunner  # noqa: E402
from bughunt.spec import load_spec  # noqa: E402
from bughunt.trace import capture_points, point_order  # noqa: E402

FAMILIES = tuple(FAMILY_ARCH)
# The settings that remove llama.cpp's known storage rounding: an f32 K/V cache (its default is f16).
EXACT = "kv_cache=f32,flash_attn=off"

# Where llama.cpp computes the tiny config differently from the reference (first point above the fp32 floor, and why,
# from llama.cpp's source at the vendored commit). Every other family must sit at the floor.
DEPARTS = {
    "gemma": ("layer.0.mlp", "ggml-cpu evaluates GELU through an fp16 lookup table (GGML_GELU_FP16)"),
    "gemma2": ("layer.0.attn", "the query scale comes from the layer count (27B or not), not query_pre_attn_scalar=24"),
    "gemma3": ("layer.0.attn", "the query scale comes from the layer count (27B or not), not query_pre_attn_scalar=24"),
    "mistral": ("layer.0.attn", "Mistral converts to the llama graph, which has no sliding window (window 4, 12 tokens)"),
    "phi3": ("layer.0.attn", "llama.cpp switches Phi-3's sliding window off when it loads ('Phi SWA is currently disabled')"),
}
# Where llama.cpp refuses the tiny config: the run is a failed implementation in the report, with llama.cpp's reason.
FAILS = {
    "qwen2": "tensor 'blk.0.attn_q.weight' has wrong shape",  # its qwen2 graph assumes head_dim = hidden / heads (16 != 12)
}


@pytest.fixture(scope="module")
def gguf(tiny):
    """Every family's f32 GGUF, converted in one converter process."""
    return dict(zip(FAMILIES, convert_many([(tiny[f], "fp32") for f in FAMILIES])))


@pytest.fixture(scope="module")
def results(tiny, tokens, gguf):
    return {f: compare(tiny[f], [f"llamacpp:fp32[{EXACT}]", "reference"], dtype="fp32", tokens=tokens, isolate=False,
                       render=False) for f in FAMILIES}


def _comparison(result):
    return result.data["comparisons"][0]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in DEPARTS and f not in FAILS])
def test_llamacpp_at_fp32_sits_at_the_floor_where_it_implements_the_config_as_the_reference(family, results):
    c = _comparison(results[family])
    worst = max(c["points"], key=lambda p: p["ratio_to_floor"])
    assert c["first_above_floor"] is None, f"{family}: {worst['point']} is {worst['ratio_to_floor']:.1f}x the floor"
    assert not [f for f in results[family].data["findings"] if f["kind"] in ("divergence", "failure")]


@pytest.mark.parametrize("family", sorted(DEPARTS))
def test_llamacpp_departures_are_findings_at_the_point_where_they_start(family, results):
    point, why = DEPARTS[family]
    c = _comparison(results[family])
    assert c["first_above_floor"] == point, why
    finding = next(f for f in results[family].data["findings"] if f["kind"] == "divergence")
    assert finding["point"] == point and finding["severity"] == "warning"
    before = [p for p in c["points"] if point_order(p["point"]) < point_order(point)]
    assert before and not any(p["above_floor"] for p in before)


@pytest.mark.parametrize("family", sorted(FAILS))
def test_a_config_llamacpp_refuses_is_a_failed_implementation_in_the_report(family, results):
    entry = next(e for e in results[family].data["implementations"] if e["name"] == "llamacpp")
    assert entry["status"] == "failed" and FAILS[family] in entry["error"], entry["error"]
    assert [f for f in results[family].data["findings"] if f["kind"] == "failure"]


def test_the_trace_says_how_it_was_converted_and_run(results, gguf):
    entry = next(e for e in results["gemma2"].data["implementations"] if e["name"] == "llamacpp")
    meta = entry["meta"]
    assert meta["llamacpp_settings"] == {"kv_cache": "f32", "flash_attn": "off"}
    conv = meta["conversion"]
    assert conv["outtype"] == "f32" and conv["gguf_arch"] == "gemma2"
    assert conv["vocabulary"] == "none" and "refused the tokenizer" in conv["vocabulary_reason"]
    versions = meta["versions"]
    assert versions["llama_cpp_python"] == "0.3.36" and versions["llama_cpp_commit"] != "unknown"
    assert "GGML_NATIVE=OFF" in versions["build_flags"]
    assert meta["graph_nodes"]["layer.2.mlp"] == "ffn_post_norm"  # no layer index in the name: placed by graph order
    assert meta["graph_nodes"]["layer.2.attn"] == "attn_post_norm-2"


@pytest.mark.parametrize("family", ["gemma2", "phi3", "llama"])
def test_every_layer_and_position_is_captured_and_the_branches_add_up(family, tiny, gguf):
    spec = load_spec(tiny[family])
    ids = np.array([[2, 17, 99, 5, 200, 31, 7], [2, 9, 9, 41, 3, 250, 6]])
    with LlamaCppRunner(tiny[family], spec, "fp32", toggles={"kv_cache": "f32"}) as r:
        trace = r.run(ids)
    assert set(trace.arrays) == set(capture_points(spec.num_layers, branches=True))
    for name, a in trace.arrays.items():
        width = spec.vocab_size if name == "logits" else spec.hidden_size
        assert a.shape == (2, 7, width), name
    # the residual stream leaving layer i is the one entering it plus its two branches: the captures are the branches
    for i in range(spec.num_layers):
        before = trace.arrays["embed" if i == 0 else f"layer.{i - 1}"]
        summed = before + trace.arrays[f"layer.{i}.attn"] + trace.arrays[f"layer.{i}.mlp"]
        np.testing.assert_allclose(trace.arrays[f"layer.{i}"], summed, rtol=1e-5, atol=1e-5)
    # sequences run one by one: the second row is what it is alone
    with LlamaCppRunner(tiny[family], spec, "fp32", toggles={"kv_cache": "f32"}) as r:
        alone = r.run(ids[1:])
    np.testing.assert_array_equal(alone.arrays["logits"][0], trace.arrays["logits"][1])


def test_the_default_settings_are_what_a_llama_cpp_user_gets(tiny, tokens, gguf):
    spec = load_spec(tiny["llama"])
    with LlamaCppRunner(tiny["llama"], spec, "fp32") as r:
        trace = r.run(tokens)
    assert trace.meta["llamacpp_settings"] == {"kv_cache": "f16", "flash_attn": "auto"}


# -- quantized types and their noise floor ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama256(tmp_path_factory):
    """A tiny llama whose rows hold whole 256-wide k-quant blocks (the usual tiny one, hidden 48, falls back to other
    types on most tensors)."""
    from bughunt.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama256"), config_overrides={
        "hidden_size": 256, "intermediate_size": 512, "head_dim": 64, "num_hidden_layers": 2})


@pytest.mark.slow
def test_a_clean_q8_0_run_sits_at_the_quantization_floor_and_a_planted_bug_on_top_still_departs(llama256, tokens):
    result = compare(llama256, ["llamacpp:q8_0[kv_cache=f32]", "llamacpp:q8_0[kv_cache=f32,rope_theta=100.0]", "reference"],
                     dtype="fp32", tokens=tokens, isolate=False, render=False)
    clean, planted = result.data["comparisons"]
    floor = result.data["noise_floor"]["q8_0"]
    assert floor["points"]["logits"]["rel_l2"] > 1e-3  # the floor is quantization's, far above fp32 rounding
    assert clean["first_above_floor"] is None, max(p["ratio_to_floor"] for p in clean["points"])
    assert planted["first_above_floor"] == "layer.0.attn"  # RoPE base 100 instead of the config's 500000
    how = result.data["implementations"][0]["meta"]["conversion"]["quantized"]
    assert how == {"type": "q8_0", "by": "llama_model_quantize", "from": "f32"}


def test_k_quant_floor_weights_are_read_back_and_unpermuted_and_a_clean_run_sits_at_that_floor(llama256, tokens):
    from bughunt.checkpoint import load_weights
    from bughunt.implementations.llamacpp import gguf_file
    from bughunt.implementations.quantized_weights import QuantizedWeights

    spec = load_spec(llama256)
    original = load_weights(llama256, spec)
    emulated = QuantizedWeights(load_weights(llama256, spec), spec, gguf_file(llama256, "q4_k_m")[0])
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        w = np.asarray(original[name], dtype=np.float64)
        err = np.linalg.norm(emulated[name] - w) / np.linalg.norm(w)
        assert "read back" in emulated.how[name] and err < 0.2, (name, emulated.how[name], err)  # permuted rows: ~1.4
    assert emulated["lm_head.weight"].shape == (spec.vocab_size, spec.hidden_size)
    assert emulated.how["lm_head.weight"].startswith("Q6_K")  # llama.cpp's q4_k_m mix: the output in q6_K
    result = compare(llama256, ["llamacpp:q4_k_m[kv_cache=f32]", "reference"], dtype="fp32", tokens=tokens,
                     isolate=False, render=False)
    assert result.data["comparisons"][0]["first_above_floor"] is None


# -- failures --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_architecture_the_converter_does_not_know_is_a_failed_implementation_in_the_report(tiny, tokens, tmp_path):
    ckpt = tmp_path / "renamed"
    shutil.copytree(tiny["llama"], ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "architectures": ["NotARealForCausalLM"]}))
    result = compare(ckpt, ["llamacpp", "reference:fp32", "reference"], dtype="fp32", tokens=tokens, isolate=False,
                     render=False)
    entry = next(e for e in result.data["implementations"] if e["name"] == "llamacpp")
    assert entry["status"] == "failed"
    assert "does not support architecture NotARealForCausalLM" in entry["error"]
    assert any(f["kind"] == "failure" and f["implementation"] == "llamacpp" for f in result.data["findings"])


def test_bad_llamacpp_choices_exit_2_with_one_message(tiny, tmp_path, capsys):
    from bughunt.cli import main

    for impl, says in (("llamacpp:q9_9", "unknown dtype 'q9_9'"), ("llamacpp[kv_cache=f8]", "toggle kv_cache='f8'")):
        code = main(["compare", str(tiny["llama"]), "--impl", impl, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and says in err and "Traceback" not in err, err
        assert not (tmp_path / "out").exists()


# -- weight check: the GGUF side ----------------------------------------------------------------------------------------
def test_weight_check_reads_the_gguf_back_and_undoes_the_converters_documented_permutation(tiny, gguf):
    from bughunt.probes.weights import check

    assert check(tiny["llama"], "llamacpp", in_process=True).counts == {"identical": 39}  # q/k permuted back exactly
    gemma2 = check(tiny["gemma2"], "llamacpp", in_process=True)
    assert set(gemma2.counts) == {"identical", "offset_by_one"}  # the converter folds Gemma's (1 + w) into the norms
    assert all(r.name.endswith("norm.weight") for r in gemma2.departures)


def test_weight_check_names_a_planted_fp16_rounding_and_a_planted_permutation_in_the_gguf(tiny, gguf, tmp_path):
    from bughunt.implementations.quantized_weights import _unpermute, import_gguf
    from bughunt.weightcheck import check_runner

    planted = tmp_path / "planted.gguf"
    shutil.copyfile(gguf["llama"][0], planted)
    reader = import_gguf().GGUFReader(str(planted), "r+")
    tensors = {t.name: t for t in reader.tensors}
    embed = tensors["token_embd.weight"].data
    embed[...] = embed.astype(np.float16).astype(np.float32)  # a converter that rounds the embedding to fp16
    q = tensors["blk.1.attn_q.weight"].data
    q[...] = _unpermute(np.array(q), 4)  # a converter that forgets the RoPE permutation of one q projection
    del reader, tensors, embed, q
    spec = load_spec(tiny["llama"])
    with LlamaCppRunner(tiny["llama"], spec, "fp32") as r:
        r.gguf_path = planted
        wc = check_runner(r)
    by_name = {x.name: x.relation for x in wc.departures}
    assert by_name == {"model.embed_tokens.weight": "rounded_fp16", "model.layers.1.self_attn.q_proj.weight": "permuted"}
