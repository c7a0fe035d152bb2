"""Long context: RoPE scaling variants against HF, divergence by position, and prefill vs incremental decoding.
Each planted bug is found at the right position or step."""

import numpy as np
import pytest

from bughunt.cli import main
from bughunt.comparison import compare
from bughunt.decode import decode_check
from bughunt.implementations.hf import HFRunner
from bughunt.implementations.reference import ReferenceRunner
from bughunt.metrics import compare_traces
from bughunt.result import Result
from bughunt.spec import load_spec
from bughunt.tiny import make_tiny_checkpoint

ORIG = 64
LONGROPE = {"original_max_position_embeddings": ORIG,
            "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                "short_factor": [1.0, 1.5, 2.0], "long_factor": [2.0, 4.0, 8.0]}}
SCALINGS = {
    "linear": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}),
    "dynamic": ("llama", {"max_position_embeddings": 128, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}),
    "yarn": ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": ORIG}}),
    "llama3": ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": ORIG, "rope_theta": 500000.0}}),
    "longrope": ("phi3", LONGROPE),
}


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    root = tmp_path_factory.mktemp("rope")
    return {name: make_tiny_checkpoint(fam, root / name, config_overrides=over) for name, (fam, over) in SCALINGS.items()}


@pytest.mark.parametrize("length", [40, 200])  # below and above the original/trained length
@pytest.mark.parametrize("kind", list(SCALINGS))
def test_reference_rope_scaling_matches_hf(kind, length, scaled):
    ck = scaled[kind]
    spec = load_spec(ck)
    assert spec.rope["full"].type == kind
    ids = np.random.default_rng(length).integers(3, 256, size=(1, length))
    with HFRunner(ck, spec, "fp32") as h, ReferenceRunner(ck, spec, "fp64") as r:
        points = compare_traces(h.run(ids), r.run(ids))
    assert max(p["rel_l2"] for p in points) < 1e-5


@pytest.mark.slow
def test_rope_positions_in_bf16_are_found_at_position_257(tiny):
    ids = np.random.default_rng(1).integers(3, 256, size=(1, 600))
    result = compare(tiny["llama"], ["hf:bf16", "hf:bf16[rope_positions=model]", "reference"], tokens=ids)
    clean, buggy = result.comparison("hf:bf16"), result.comparison("hf:bf16[rope_positions=model]")
    assert clean["first_above_floor"] is None
    assert buggy["first_above_floor"] == "layer.0.attn"
    first = next(p for p in buggy["points"] if p["point"] == "layer.0.attn")
    assert first["first_position_above_floor"] == 257  # bf16 holds every integer up to 256; 257 rounds to 256


def test_longrope_switched_one_token_late_departs_at_the_original_length(scaled):
    ids = np.random.default_rng(3).integers(3, 256, size=(1, ORIG + 6))
    result = decode_check(scaled["longrope"], "reference:fp32[longrope_switch=orig+2]", reference="reference:fp32",
                          tokens=ids, prefill=ORIG - 4)
    assert result.data["decode"]["reference"]["first_departing_step"] == ORIG  # the step whose input length is ORIG + 1
    same = decode_check(scaled["longrope"], "reference:fp32", reference="reference:fp32", tokens=ids, prefill=ORIG - 4)
    assert same.data["decode"]["reference"]["first_departing_step"] is None


def test_hf_longrope_decoding_keeps_short_factor_keys_after_the_switch(scaled):
    # A finding about longrope in transformers: its cache keeps keys rotated with the short factors, so decoding past
    # original_max_position_embeddings departs from recomputing the prefix (which rotates every key with the long ones).
    ids = np.random.default_rng(3).integers(3, 256, size=(1, ORIG + 6))
    result = decode_check(scaled["longrope"], "hf", reference="reference:fp32", tokens=ids, prefill=ORIG - 4)
    assert result.data["decode"]["reference"]["first_departing_step"] == ORIG


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3"])
def test_decoding_is_consistent_across_the_sliding_window_boundary(family, tiny):
    ids = np.random.default_rng(2).integers(3, 256, size=(1, 20))  # window 4: the cache evicts from step 4 on
    result = decode_check(tiny[family], "hf", tokens=ids, prefill=1)
    assert result.data["decode"]["path"] == "kv-cache"
    assert result.data["decode"]["self"]["first_departing_step"] is None


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sliding_window_off_by_one_in_decode_only_is_found_at_step_window_minus_one(family, tiny):
    ids = np.random.default_rng(2).integers(3, 256, size=(1, 20))
    result = decode_check(tiny[family], "hf", tokens=ids, prefill=1, decode_config={"sliding_window": 3})
    # window 4 lets query 3 see keys 0..3; the decode mask of 3 drops key 0: step 3 is the first that differs.
    assert result.data["decode"]["self"]["first_departing_step"] == 3
    assert any("departs from its own full forward pass at step 3" in f["message"] for f in result.findings)


def test_decode_cli_writes_result_and_report_and_rejects_bad_prefill(tmp_path, tiny, capsys):
    out = tmp_path / "dec"
    code = main(["decode", str(tiny["mistral"]), "--impl", "hf", "--decode-config", "sliding_window=3", "--prefill", "2",
                 "--tokens", ",".join(str(t) for t in range(3, 23)), "--out", str(out)])
    assert code == 0
    assert "first step departing from its own full pass: 3" in capsys.readouterr().out
    result = Result.load(out)
    result.validate()
    assert "Decode consistency" in (out / "report.html").read_text()
    assert main(["decode", str(tiny["mistral"]), "--prefill", "50", "--tokens", "3,4,5", "--out", str(tmp_path / "bad")]) == 2
    assert "--prefill must be between 1 and 2" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_report_has_the_layer_by_position_heatmap(tmp_path, tiny):
    compare(tiny["gemma"], ["hf", "reference"], out=tmp_path / "r")
    assert (tmp_path / "r" / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert "layer by position heatmap" in (tmp_path / "r" / "report.html").read_text()


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_every_ignored_field_hypothesis_on_scaled_rope_runs_in_the_reference(kind, scaled):
    """The search tries every field hypothesis of the config (field:<path>=ignored|absent|...); on a llama3 RoPE config
    `rope_parameters.high_freq_factor=absent` (null) once crashed the reference with a TypeError mid-search. Each must
    run, or be refused with a message (BughuntError), never crash."""
    from bughunt.errors import BughuntError
    from bughunt.toggles import available, is_field, lookup

    ck = scaled[kind]
    spec = load_spec(ck)
    ids = np.random.default_rng(0).integers(3, 256, size=(1, 8))
    tried = 0
    for name in [n for n in available(spec) if is_field(n)]:
        for value in lookup(name, spec).suggestions(spec):
            try:
                with ReferenceRunner(ck, spec, "fp64", toggles={name: value}) as r:
                    trace = r.run(ids)
            except BughuntError:
                continue
            assert np.isfinite(np.asarray(trace.arrays["logits"])).all(), f"{name}={value}"
            tried += 1
    assert tried > 5
