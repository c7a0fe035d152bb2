"""Toggles: each one moves the trace, HF applies it exactly as the reference does, wrappers are undone, and
`sweep --mode search` names planted bugs without false alarms."""

import sys

import numpy as np
import pytest

from bughunt.cli import main
from bughunt.floors import noise_floor
from bughunt.errors import BughuntError
from bughunt.implementations.hf import HFRunner
from bughunt.implementations.reference import ReferenceRunner
from bughunt.metrics import compare_traces
from bughunt.result import Result
from bughunt.spec import load_spec
from bughunt.sweep import sweep
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


PLANTED = [
    ("gemma", "fp32", {"gelu": "exact"}),
    ("gemma2", "fp32", {"attn_softcap": "off"}),
    ("gemma2", "fp32", {"query_scale": "rsqrt:16"}),
    ("gemma2", "fp32", {"final_softcap": "off", "gelu": "exact"}),
    ("gemma3", "fp32", {"sliding_window": "3"}),
    ("mistral", "fp32", {"sliding_window": "5"}),
    ("llama", "fp32", {"rms_eps": "1e-05"}),
    ("llama", "fp32", {"rope_theta": "10000.0"}),
    ("qwen2", "fp32", {"rope_pairing": "interleaved"}),
    ("phi3", "fp32", {"rope_pairing": "interleaved", "rms_eps": "1e-05"}),
    ("qwen3", "fp32", {"query_scale": "rsqrt:12"}),  # hidden/heads instead of head_dim
    ("llama", "bf16", {"rope_dtype": "model"}),
    ("gemma", "bf16", {"embed_scale_dtype": "fp32", "bos": "off"}),
    ("gemma3", "bf16", {"rope_dtype": "model", "gelu": "exact"}),
]


@pytest.mark.slow
@pytest.mark.parametrize("family, dtype, planted", PLANTED, ids=[f"{f}-{d}-{'-'.join(p)}" for f, d, p in PLANTED])
def test_search_names_exactly_the_planted_toggles_and_the_residual_falls_to_the_floor(family, dtype, planted, tiny):
    result = sweep(tiny[family], impl="hf", dtype=dtype, mode="search", candidate_toggles=planted)
    s = result.data["sweep"]["search"]
    # the search may name it as an ignored config field that has the same effect: another spelling of one explanation
    assert planted in s["equivalent"] and s["equivalent"][0] == s["best"]
    assert s["at_floor"] and s["residual"]["first_above_floor"] is None
    assert result.comparisons[0]["first_above_floor"] is not None or dtype == "bf16"  # the planted bug shows as is
    assert len(s["ablation"]) == len(planted)
    assert all(a["delta"] > 0.05 for a in s["ablation"])
    assert "behaves like the reference with" in s["diagnosis"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_search_reports_nothing_when_nothing_is_planted(family, dtype, tiny):
    s = sweep(tiny[family], impl="hf", dtype=dtype, mode="search").data["sweep"]["search"]
    assert s["best"] == {} and s["at_floor"]
    assert "agrees with the reference as it is" in s["diagnosis"]


@pytest.mark.slow
def test_search_on_the_candidate_side_names_the_fix(tiny):
    # The candidate runs with the planted bug; the reference carries the same "bug" fixed. Sweeping the candidate
    # side asks which fix makes HF match: the reference-side sliding window of 3 is matched by setting HF's to 3.
    result = sweep(tiny["gemma2"], impl="hf", mode="search", side="candidate", reference_toggles={"sliding_window": "3"},
                   toggles=["sliding_window", "gelu"])
    s = result.data["sweep"]["search"]
    assert s["best"] == {"sliding_window": "3"} and s["at_floor"]
    assert "matches the reference once {sliding_window=3}" in s["diagnosis"]


@pytest.mark.slow
def test_sweep_cli_writes_every_configuration_and_the_diagnosis(tmp_path, tiny, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", str(tiny["gemma2"]), "--impl", "hf", "--candidate-toggle", "gelu=exact", "--mode", "search",
                 "--toggle", "gelu", "--toggle", "attn_softcap", "--toggle", "rope_pairing", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "DIAGNOSIS: implementation hf{gelu=exact} behaves like the reference with {gelu=exact}" in printed
    result = Result.load(out)
    result.validate()
    sw = result.data["sweep"]
    assert sw["search"]["method"] == "exhaustive" and sw["search"]["space_size"] == 8 and sw["search"]["evaluated"] == 8
    assert len(sw["configurations"]) == 8 and all(len(c["curve"]) == 6 for c in sw["configurations"])
    html = (out / "report.html").read_text()
    assert "behaves like the reference with {gelu=exact}" in html and "every configuration" in html


@pytest.mark.slow
def test_cumulative_mode_draws_one_line_per_prefix(tmp_path, tiny, capsys):
    out = tmp_path / "cum"
    code = main(["sweep", str(tiny["gemma"]), "--impl", "hf", "--reference", "reference", "--dtype", "bf16", "--mode", "cumulative",
                 "--toggle", "gelu=exact", "--toggle", "rope_dtype=model", "--toggle", "embed_scale_dtype=fp32", "--out", str(out)])
    assert code == 0
    result = Result.load(out)
    assert [c["candidate"] for c in result.comparisons] == [
        "as is", "reference + {gelu=exact}", "reference + {gelu=exact, rope_dtype=model}",
        "reference + {embed_scale_dtype=fp32, gelu=exact, rope_dtype=model}"]


@pytest.mark.parametrize("argv, message", [
    (["--toggle", "gelu=sigmoid"], "allowed values"),
    (["--toggle", "warp=9"], "unknown toggle"),
    (["--mode", "cumulative"], "needs at least one --toggle"),
    (["--side", "candidate", "--mode", "search", "--toggle", "norm_dtype"], "cannot apply toggle norm_dtype"),
])
def test_bad_sweeps_exit_2(argv, message, tmp_path, tiny, capsys):
    assert main(["sweep", str(tiny["gemma"]), "--out", str(tmp_path / "o")] + argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


SCREENED = [PLANTED[i] for i in (1, 3, 7, 9, 12)]


@pytest.mark.slow
@pytest.mark.parametrize("family, dtype, planted", SCREENED, ids=[f"{f}-{d}-{'-'.join(p)}" for f, d, p in SCREENED])
def test_screening_finds_what_the_full_search_finds_with_fewer_full_passes(family, dtype, planted, tiny, monkeypatch):
    """The search screens settings on the layers up to the first departure and runs only its shortlist in full; with
    screening off (every setting run in full) it must reach the same answer."""
    from bughunt import search as search_module

    screened = sweep(tiny[family], impl="hf", dtype=dtype, mode="search", candidate_toggles=planted).data["sweep"]["search"]
    monkeypatch.setattr(search_module, "CONFIRM_MAX", 10**9)  # no list of settings is longer: nothing is screened
    full = sweep(tiny[family], impl="hf", dtype=dtype, mode="search", candidate_toggles=planted).data["sweep"]["search"]
    assert full["screening"] == [] and screened["screening"]
    assert all(s["layers"] < load_spec(tiny[family]).num_layers for s in screened["screening"])
    assert screened["best"] == full["best"] and screened["equivalent"] == full["equivalent"]
    assert screened["at_floor"] == full["at_floor"] and screened["diagnosis"] == full["diagnosis"]
    assert screened["evaluated"] < full["evaluated"] and screened["passes"]["full"] < full["passes"]["full"]
    # settings that compute the same thing (spellings of one setting) share one pass: fewer passes than settings
    assert full["passes"]["full"] < full["evaluated"] and full["passes"]["screening"] == 0
