"""Points inside the layer (--inner) and isolated layers (--isolate), on hf and the reference, with bugs planted in
transformers itself: a query scale (the `query_scale` toggle sets each attention module's `scaling`) and one layer's
attention type (`config_overrides`: layer 1 of Gemma 2 made sliding, a layer_types pattern replaced)."""

import numpy as np
import pytest

from bughunt.cli import main
from bughunt.execute import run_implementation
from bughunt.floors import noise_floor
from bughunt.judging import judge
from bughunt.implementations import ImplChoice
from bughunt.metrics import compare_traces
from bughunt.result import Result
from bughunt.spec import load_spec
from bughunt.trace import INNER_POINTS, is_residual_point

PLANTED = "hf[query_scale=0.5]"


@pytest.fixture(scope="module")
def run(tiny, tokens, tmp_path_factory):
    out = tmp_path_factory.mktemp("inner") / "report"
    ids = ",".join(str(t) for t in tokens[0])
    code = main(["compare", str(tiny["gemma2"]), "--impl", "hf", "--impl", PLANTED, "--impl", "reference", "--tokens", ids,
                 "--inner", "--isolate", "--weight-check", "--out", str(out)])
    assert code == 0
    result = Result.load(out)
    result.validate()  # inner point names and the isolated comparisons fit the result schema
    return result, out


def test_inner_points_locate_a_planted_query_scale_at_the_scores(run, tiny):
    result, _ = run
    c = result.comparison(PLANTED)
    assert c["first_above_floor"] == "layer.0.attn.scores"
    by = {p["point"]: p for p in c["points"]}
    assert not by["layer.0.attn.q"]["above_floor"] and not by["layer.0.attn.k"]["above_floor"]  # before the scale: clean
    assert all(f"layer.{i}.{p}" in by for i in range(4) for p in INNER_POINTS)
    finding = next(f for f in result.findings if f["kind"] == "divergence" and f["implementation"] == PLANTED)
    assert "layer.0.attn.scores" in finding["message"]


def test_clean_hf_has_no_false_alarm_inside_the_layer_or_in_isolation(run):
    result, _ = run
    c = result.comparison("hf")
    assert c["first_above_floor"] is None and c["isolated"]["first_above_floor"] is None
    assert c["isolated"]["layers_above_floor"] == []
    assert max(p["ratio_to_floor"] for p in c["points"] if p["point"].endswith(".scores")) < 10
    assert not [f for f in result.findings if f["kind"] == "weights"]  # both hf runs hold the checkpoint's parameters


def test_isolation_is_drawn_beside_the_accumulated_error(run):
    result, out = run
    assert result.data["settings"]["inner"] and result.data["settings"]["isolate"]
    assert result.comparison(PLANTED)["isolated"]["layers_above_floor"] == [f"layer.{i}" for i in range(4)]  # every layer scales
    html = (out / "report.html").read_text()
    assert (out / "isolated.png").stat().st_size > 0 and "<h2>Isolated layers</h2>" in html
    assert "--inner --isolate --weight-check" in result.data["command"] and "<h2>Weights</h2>" in html


def test_a_single_layer_bug_is_one_spike_in_isolation_and_a_ramp_accumulated(tiny, tokens):
    ck = tiny["gemma2"]  # layer_types sliding, full, sliding, full; window 4 < 12 tokens
    spec = load_spec(ck)
    pattern = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]  # layer 1 now sliding
    ref = run_implementation(ImplChoice("reference", "fp64"), ck, spec, "fp64", "cpu", tokens)
    floor = noise_floor(ck, spec, "fp32", tokens, fp64=ref)
    hf = ImplChoice("hf")
    accumulated = run_implementation(hf, ck, spec, "fp32", "cpu", tokens, config_overrides={"layer_types": pattern})
    isolated = run_implementation(hf, ck, spec, "fp32", "cpu", tokens, feed=ref, config_overrides={"layer_types": pattern})
    acc, first = judge(compare_traces(accumulated, ref), floor, 10.0)
    iso, _ = judge(compare_traces(isolated, ref), floor, 10.0)
    layers = lambda points: [p["point"] for p in points if p["above_floor"] and is_residual_point(p["point"]) and p["point"].startswith("layer.")]  # noqa: E731
    assert first == "layer.1.attn"
    assert layers(acc) == ["layer.1", "layer.2", "layer.3"]  # inherited by every later layer
    assert layers(iso) == ["layer.1"]  # its own error only
    by = {p["point"]: p for p in iso}
    assert by["layer.2"]["ratio_to_floor"] < 10 and by["layer.1"]["ratio_to_floor"] > 1e3


def test_the_reference_can_be_isolated_too(tiny, tokens):
    ck = tiny["llama"]
    spec = load_spec(ck)
    fp64 = ImplChoice("reference", "fp64")
    ref = run_implementation(fp64, ck, spec, "fp64", "cpu", tokens, inner=True)
    again = run_implementation(fp64, ck, spec, "fp64", "cpu", tokens, inner=True, feed=ref)
    assert all(m["l2"] == 0.0 for m in compare_traces(again, ref))  # fed its own inputs, it reproduces itself exactly
    eps = ImplChoice("reference", "fp64", toggles=(("rms_eps", "0.5"),))
    accumulated = run_implementation(eps, ck, spec, "fp64", "cpu", tokens, toggles={"rms_eps": "0.5"})
    isolated = run_implementation(eps, ck, spec, "fp64", "cpu", tokens, feed=ref, toggles={"rms_eps": "0.5"})
    acc = {m["point"]: m["rel_l2"] for m in compare_traces(accumulated, ref)}
    iso = {m["point"]: m["rel_l2"] for m in compare_traces(isolated, ref)}
    assert acc["layer.0"] == iso["layer.0"]  # the first layer has nothing to inherit
    assert acc["layer.3"] > 2 * iso["layer.3"]  # later layers inherit in the accumulated run only
