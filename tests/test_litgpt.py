"""The litgpt implementation: it runs in its own environment (`make litgpt`, which `make test` runs), its worker is
started there without the user naming an interpreter, and at fp32 it is within the fp32 floor of the float64
reference on every family it supports. Without its environment, it is refused with the command that creates it."""

import pytest

from bughunt.cli import main
from bughunt.comparison import compare
from bughunt.envs import own_python
from bughunt.implementations import ImplChoice, runner_class
from bughunt.tiny import TINY_FAMILIES
from bughunt.worker import WorkerPool


@pytest.fixture(scope="module")
def pool():
    if own_python("litgpt") is None:
        pytest.skip("litgpt's environment is missing: create it with `make litgpt` (make test does)")
    with WorkerPool() as p:  # one litgpt worker serves every family: torch and litgpt import once
        yield p


@pytest.mark.slow
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_litgpt_at_fp32_is_within_the_floor_of_the_reference(pool, tiny, tokens, family):
    assert family in runner_class("litgpt").families
    result = compare(tiny[family], ["litgpt", "reference"], dtype="fp32", tokens=tokens, render=False, pool=pool)
    entry = next(e for e in result.data["implementations"] if e["label"] == "litgpt")
    assert entry["status"] == "ok", entry["error"]
    assert entry["meta"]["worker"]["python"] == own_python("litgpt")  # chosen without `@PYTHON`
    assert entry["meta"]["versions"]["litgpt"] == "0.5.13"
    comparison = result.comparison("litgpt")
    assert len(comparison["points"]) == 3 + 3 * 4  # embed, 4 x (attn, mlp, layer), final_norm, logits
    assert comparison["first_above_floor"] is None, comparison["first_above_floor"]


def test_litgpt_without_its_environment_is_refused_with_the_command_that_creates_it(tmp_path, tiny, monkeypatch, capsys):
    monkeypatch.setenv("BUGHUNT_LITGPT_PYTHON", str(tmp_path / "no-such-env" / "bin" / "python"))
    out = tmp_path / "out"
    code = main(["compare", str(tiny["llama"]), "--impl", "litgpt", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "litgpt" in err and "make litgpt" in err and "BUGHUNT_LITGPT_PYTHON" in err and "Traceback" not in err
    assert not out.exists()


def test_litgpt_is_refused_in_process_and_by_decode(tiny):
    from bughunt.decode import decode_check
    from bughunt.errors import BughuntError

    with pytest.raises(BughuntError, match="needs a worker process"):
        compare(tiny["llama"], ["litgpt", "reference"], isolate=False, render=False)
    with pytest.raises(BughuntError, match="decode runs implementations in this process"):
        decode_check(tiny["llama"], impl="litgpt", prefill=2)
    assert ImplChoice.parse("litgpt:bf16").label == "litgpt:bf16"  # no interpreter in the label: baselines stay portable
