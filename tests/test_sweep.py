"""`bughunt sweep`: the search names planted bugs without false alarms (also from the candidate side), screening
reaches the full search's answer with fewer full passes, and the CLI and cumulative mode write what they say. The
passes a sweep runs: reference passes side by side, or cut after a few layers, equal the same passes run alone, and
the candidate's loaded model is reused across toggles that need no reload."""

import numpy as np
import pytest

from bughunt.cli import main
from bughunt.implementations.reference import ReferenceRunner
from bughunt.result import Result
from bughunt.spec import load_spec
from bughunt.sweep import sweep
from bughunt.tiny import TINY_FAMILIES


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


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_passes_run_side_by_side_equal_the_same_passes_run_alone(family, tiny, tokens, tmp_path):
    """forward_many shares each layer's converted weights between passes; nothing else may change."""
    from bughunt.implementations.reference import run_together

    spec = load_spec(tiny[family])
    settings = [("fp64", {}), ("bf16", {}), ("fp16", {}), ("bf16", {"gelu": "exact"} if family == "gemma2" else {"rope_theta": "5000"})]
    runners = [ReferenceRunner(tiny[family], spec, d, toggles=t, label=f"{d}{t}") for d, t in settings]
    for r in runners:
        r.open()
    together = run_together(runners, tokens, [tmp_path / f"t{i}" for i in range(len(runners))])
    for r, trace in zip(runners, together):
        alone = r.run(tokens)
        assert trace.meta["timings"]["together_with"] == len(runners)
        for p in alone.points():
            np.testing.assert_array_equal(trace.arrays[p], alone.arrays[p], err_msg=f"{r.label} {p}")
        r.close()
    assert not np.array_equal(together[0].arrays["logits"], together[1].arrays["logits"])  # the passes really differ


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_screening_pass_stops_after_its_layers_and_equals_the_full_pass_there(family, tiny, tokens, tmp_path):
    """The search's screening passes (run_together(layers=L)) hold the embedding and L decoder layers, bit for bit."""
    from bughunt.implementations.reference import run_together

    spec = load_spec(tiny[family])
    runners = [ReferenceRunner(tiny[family], spec, d) for d in ("fp64", "bf16")]
    for r in runners:
        r.open()
    short = run_together(runners, tokens, [tmp_path / "a", tmp_path / "b"], layers=1)
    for r, trace in zip(runners, short):
        full = r.run(tokens)
        assert set(trace.points()) == {p for p in full.points() if p == "embed" or p.startswith("layer.0")}
        for p in trace.points():
            np.testing.assert_array_equal(trace.arrays[p], full.arrays[p], err_msg=p)
        r.close()


@pytest.mark.slow
def test_a_candidate_side_sweep_switches_live_toggles_on_the_loaded_model(tiny, tokens):
    """Module swaps (gelu, query scale, RoPE wrappers) need no reload; config values do. Either way the trace is
    exactly what a fresh load with the same toggles gives."""
    from bughunt.execute import run_trace
    from bughunt.implementations import ImplChoice
    from bughunt.jobs import Load, TraceJob
    from bughunt.worker import WorkerPool

    ck, spec = tiny["gemma"], load_spec(tiny["gemma"])
    import tempfile
    from pathlib import Path

    scratch = Path(tempfile.mkdtemp())
    with WorkerPool() as pool:
        run = lambda tg, i: run_trace(Load(ImplChoice("hf"), ck, spec, "fp32", toggles=tg), TraceJob(tokens, scratch / f"t{i}"), pool)  # noqa: E731
        first = run({}, 0)
        live = run({"gelu": "exact"}, 1)
        back = run({}, 2)
        config = run({"gelu": "exact", "rms_eps": "0.001"}, 3)
    assert first.meta["worker"]["reused_loaded_model"] is False
    assert live.meta["worker"]["reused_loaded_model"] is True
    assert config.meta["worker"]["reused_loaded_model"] is False  # rms_eps is read when the model is built
    assert back.meta["worker"]["reused_loaded_model"] is True
    from bughunt.implementations.hf import HFRunner

    with HFRunner(ck, spec, "fp32", toggles={"gelu": "exact"}) as fresh:
        expected = fresh.run(tokens)
    for p in expected.points():
        np.testing.assert_array_equal(live.arrays[p], expected.arrays[p], err_msg=p)
        np.testing.assert_array_equal(back.arrays[p], first.arrays[p], err_msg=p)  # undone exactly
    assert not np.array_equal(live.arrays["logits"], first.arrays["logits"])
