"""The compare pipeline's seams (issue 20): every refusal while the plan is built, before any environment is built;
options validated at the edge; probes as plug-ins (the logit lens needs no runner code); one capture-point vocabulary;
and the structure limits, counted from the code."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import bughunt
from bughunt import points as P
from bughunt.errors import BughuntError

ROOT = Path(__file__).resolve().parents[1]


def _structure():
    spec = importlib.util.spec_from_file_location("structure", ROOT / "benchmarks" / "structure.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["structure"] = module
    spec.loader.exec_module(module)
    return module


def test_no_import_circles_and_every_function_within_the_limits():
    facts = _structure().facts()
    assert facts["import_circles"] == []
    assert facts["functions_over_line_limit"] == [], facts["functions_over_line_limit"]
    assert facts["functions_over_parameter_limit"] == [], facts["functions_over_parameter_limit"]


def test_a_new_probe_touches_its_module_its_registration_and_its_template():
    assert _structure().probe_files("logit_lens") == ["bughunt/probes/__init__.py", "bughunt/probes/logit_lens.py",
                                                      "bughunt/templates/sections/logit_lens.html"]


def test_the_plan_refuses_before_a_library_environment_is_built(tiny, tmp_path, monkeypatch):
    """A run the memory plan refuses never starts building the hf==X environment it names (minutes of pip)."""
    monkeypatch.setenv("BUGHUNT_ENVS", str(tmp_path / "envs"))
    with pytest.raises(BughuntError, match="cannot fit"):
        bughunt.compare(tiny["llama"], ["hf==5.21.0", "reference"], max_memory=1 << 20, render=False)
    assert not (tmp_path / "envs").exists()


@pytest.mark.parametrize("settings, message", [
    ({"bogus": 1}, "unknown option 'bogus'"),
    ({"dtype": "fp8"}, "unknown dtype 'fp8'"),
    ({"floor_factor": 0}, "--floor-factor must be positive"),
    ({"device_map": "balanced"}, "--device-map 'balanced' is not supported"),
    ({"generate": 0}, "--generate must be a number of tokens"),
    ({"decode_config": {"sliding_window": 3}}, "add --generate N"),
])
def test_options_are_validated_at_the_edge(tiny, settings, message):
    with pytest.raises(BughuntError, match=message):
        bughunt.compare(tiny["llama"], ["reference:fp32", "reference"], render=False, **settings)


def test_logit_lens_agrees_for_an_emulation_and_names_the_layer_a_bug_flips_tokens(tiny):
    """The reference's final norm and unembedding at every layer: an fp32 emulation agrees with float64 everywhere; RoPE
    theta 10 (a planted bug) changes the top-1 token somewhere, and the finding names the first layer where it does."""
    result = bughunt.compare(tiny["llama"], ["reference:fp32", "reference:fp32[rope_theta=10.0]", "reference"],
                             tokens=[[2, 17, 99, 5, 200, 31, 7, 8, 150, 42, 3, 250]], render=False, logit_lens=True)
    lens = {c["candidate"]: c for c in result.data["logit_lens"]["candidates"]}
    layers = result.data["logit_lens"]["layers"]
    assert layers == [P.layer(i) for i in range(len(layers))]
    assert lens["reference:fp32"]["top1_agreement"] == [1.0] * len(layers)
    assert lens["reference:fp32"]["first_layer_below_full"] is None
    buggy = lens["reference:fp32[rope_theta=10.0]"]
    assert min(buggy["top1_agreement"]) < 1.0
    first = buggy["first_layer_below_full"]
    finding = next(f for f in result.findings if f["kind"] == "logit_lens" and f["implementation"] == "reference:fp32[rope_theta=10.0]")
    assert finding["point"] == first and f"first disagrees with reference's at {first}" in finding["message"]
    ref_vs_final = result.data["logit_lens"]["reference_vs_final"]
    assert ref_vs_final[-1] == 1.0  # the last layer's lens is the model's own prediction
    assert "--logit-lens" in result.data["command"]
    from bughunt.summary import format_summary

    printed = format_summary(result)
    assert "logit lens reference:fp32: top-1 agrees with reference at every layer" in printed
    assert f"logit lens reference:fp32[rope_theta=10.0]: top-1 first disagrees at {first}" in printed


def test_logit_lens_is_in_the_report(tiny, tmp_path):
    bughunt.compare(tiny["gemma"], ["reference:fp32", "reference"], tokens=[[2, 17, 99, 5]], logit_lens=True,
                    out=tmp_path / "out")
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Logit lens" in html and "reference:fp32 vs reference" in html


def test_capture_point_names_are_built_and_parsed_in_one_place():
    assert P.layer(3) == "layer.3" and P.branch(3, "attn") == "layer.3.attn"
    assert P.inner(0, "attn", "scores") == "layer.0.attn.scores" and P.inner(1, "mlp", "hidden") == "layer.1.mlp.hidden"
    for name in ("embed", "layer.12", "layer.0.mlp", "layer.2.attn.probs", "final_norm", "logits"):
        p = P.parse(name)
        assert P.name(p.layer, p.branch, p.inner) == name if p.layer is not None else name in (P.EMBED, P.FINAL_NORM, P.LOGITS)
    assert P.parse("layer.4").is_layer_output and not P.parse("layer.4.attn").is_layer_output
    for bad in ("layer", "layer.x", "layer.01", "layer.1.ffn", "layer.1.mlp.q", "layer.1.attn.q.x", "embeds"):
        with pytest.raises(ValueError):
            P.parse(bad)
    with pytest.raises(ValueError):
        P.inner(0, "mlp", "scores")


def test_a_probe_declares_its_options_and_flags():
    from bughunt import probes
    from bughunt.cli import build_parser

    owners = probes.option_names()
    assert owners["generate"].name == "generate" and owners["logit_lens"].name == "logit_lens"
    args = build_parser().parse_args(["compare", "ck", "--logit-lens", "--generate", "4", "--isolate"])
    given = {k: v for p in probes.registered() for k, v in p.from_args(args).items()}
    assert given["logit_lens"] is True and given["generate"] == 4 and given["isolate_layers"] is True
    assert np.all([p.Options.model_config.get("extra") == "forbid" for p in probes.registered()])
