"""The loss on the input (issue 14, item 3): each implementation's negative log-likelihood of the actual next tokens,
its difference from the reference judged against the dtype's loss floor, the per-position plot and the ci rules.
Real transformers, tiny checkpoints, no mocks."""

from __future__ import annotations

import numpy as np
import pytest

from bughunt.cli import main
from bughunt.comparison import compare
from bughunt.metrics import token_nll
from bughunt.result import Result

IDS = [[2, 17, 99, 5, 200, 31, 7, 8, 150, 42, 3, 250]]


def logits_point(result: Result, candidate: str) -> dict:
    return next(p for p in result.comparison(candidate)["points"] if p["point"] == "logits")


@pytest.fixture(scope="module")
def llama_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("loss") / "run"
    result = compare(tiny["llama"], ["hf:fp32", "hf:bf16", "reference"], tokens=IDS, isolate=False, out=out)
    return result, out


def test_nll_is_the_cross_entropy_of_the_next_tokens(llama_run, tiny):
    """The figure is what torch's cross-entropy gives on HF's own logits, position by position."""
    import torch

    from bughunt.implementations.hf import HFRunner
    from bughunt.spec import load_spec

    result, _ = llama_run
    with HFRunner(tiny["llama"], load_spec(tiny["llama"]), "fp32") as runner:
        logits = torch.from_numpy(runner.forward_plain(np.asarray(IDS)))
    ids = torch.tensor(IDS)
    ce = torch.nn.functional.cross_entropy(logits[0, :-1].double(), ids[0, 1:], reduction="none").numpy()
    p = logits_point(result, "hf:fp32")
    np.testing.assert_allclose(p["nll_per_position"], ce, rtol=1e-5)
    assert p["nll"] == pytest.approx(ce.mean(), rel=1e-5)
    np.testing.assert_allclose(token_nll(logits.numpy(), np.asarray(IDS))[0], ce, rtol=1e-6)
    assert p["ppl_ratio"] == pytest.approx(np.exp(p["delta_nll"]))
    assert len(p["delta_nll_per_position"]) == len(IDS[0]) - 1


def test_delta_nll_at_the_floor_at_fp32_and_larger_at_bf16_within_its_floor(llama_run):
    result, _ = llama_run
    fp32, bf16 = logits_point(result, "hf:fp32"), logits_point(result, "hf:bf16")
    assert not fp32["nll_above_floor"] and fp32["delta_nll_ratio_to_floor"] <= 10
    assert fp32["abs_delta_nll"] < 1e-4
    assert not bf16["nll_above_floor"] and bf16["delta_nll_ratio_to_floor"] <= 10
    assert bf16["abs_delta_nll"] > 100 * fp32["abs_delta_nll"]  # bf16 moves the loss, by about what its floor allows
    assert bf16["floor_delta_nll"] > 100 * fp32["floor_delta_nll"]
    assert not [f for f in result.findings if f["kind"] == "loss"]


def test_loss_plot_and_table_in_the_report(llama_run):
    result, out = llama_run
    assert (out / "loss.png").stat().st_size > 5000
    html = (out / "report.html").read_text()
    assert "Loss on the input" in html and "perplexity ratio" in html
    Result.load(out).validate()


def test_a_planted_bug_changes_the_loss_above_the_floor(tiny):
    """Exact instead of tanh GELU in HF (a real toggle: transformers' own activation swapped in) moves the loss."""
    result = compare(tiny["gemma"], ["hf:fp32[gelu=exact]", "reference"], tokens=IDS, isolate=False, render=False)
    p = logits_point(result, "hf:fp32[gelu=exact]")
    assert p["nll_above_floor"] and p["delta_nll_ratio_to_floor"] > 10
    finding = next(f for f in result.findings if f["kind"] == "loss")
    assert finding["implementation"] == "hf:fp32[gelu=exact]" and "perplexity" in finding["message"]


MATRIX = """
implementations = ["hf", "hf[gelu=exact]"]
dtypes = ["fp32"]
tokens = {{ prompt = "The quick brown fox jumps over the lazy dog." }}

[[checkpoints]]
tiny = "gemma"

[[thresholds]]
metric = "delta_nll"
floor_factor = 10

[[thresholds]]
metric = "ppl_ratio"
max = 1.5
min = 0.67
"""


@pytest.mark.slow
def test_ci_judges_the_loss_on_text_against_its_floor(tmp_path):
    """A text prompt through the tiny checkpoint's tokenizer; the clean cell is at the loss floor, the planted GELU not."""
    matrix = tmp_path / "m.toml"
    matrix.write_text(MATRIX.format())
    out = tmp_path / "out"
    code = main(["ci", str(matrix), "--baseline", str(tmp_path / "b"), "--update-baseline", "--out", str(out)])
    summary = (out / "summary.md").read_text()
    assert code == 1, summary
    assert "| `gemma/hf:fp32/cpu` | ✅ pass" in summary
    assert "| `gemma/hf:fp32[gelu=exact]/cpu` | ❌ regression | logits | |delta_nll|" in summary.replace("\\|", "|")
    assert "the fp32 noise floor" in summary
    baseline = (tmp_path / "b" / "gemma__hf-fp32__cpu.json").read_text()
    assert '"delta_nll"' in baseline and '"ppl_ratio"' in baseline


def test_ci_refuses_a_floor_rule_on_a_metric_without_a_floor(tmp_path, capsys):
    matrix = tmp_path / "m.toml"
    matrix.write_text(MATRIX.format().replace('metric = "ppl_ratio"\nmax = 1.5\nmin = 0.67', 'metric = "ppl_ratio"\nfloor_factor = 3'))
    assert main(["ci", str(matrix), "--baseline", str(tmp_path / "b"), "--update-baseline", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "thresholds[1].floor_factor" in err and 'metric = "delta_nll"' in err
    assert not (tmp_path / "o").exists()
