"""The weight check (bughunt weights, and the Weights section of compare): each loaded parameter against the
checkpoint, with its relation named. Bugs are planted in the real library's loaded model (an HFRunner subclass that
edits parameters after transformers loaded them); keras-hub's Mistral converter casts every weight to fp16 on its own."""

import importlib.util
import json

import ml_dtypes
import numpy as np
import pytest
import torch

from bughunt.cli import main
from bughunt.implementations.hf import HFRunner
from bughunt.spec import load_spec
from bughunt.probes.weights import check
from bughunt.weightcheck import check_runner, classify, rope_interleave

HAVE_KERAS = all(importlib.util.find_spec(m) for m in ("keras", "keras_hub", "jax"))
HAVE_GEMMA = all(importlib.util.find_spec(m) for m in ("gemma", "kauldron", "flax", "jax"))


# -- the classifier ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def w():
    return np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)


def test_classifier_names_each_relation(w):
    assert classify("x", w, w.copy()).relation == "identical"
    assert classify("x", w, w.astype(np.float16)).relation == "rounded_fp16"
    assert classify("x", w, w.astype(ml_dtypes.bfloat16).astype(np.float32)).relation == "rounded_bf16"
    assert classify("x", w, w.T.copy()).relation == "transposed"
    assert classify("x", w, w.T.astype(np.float16)).relation == "transposed+rounded_fp16"
    norm = w[0]
    assert classify("model.norm.weight", norm, norm + 1).relation == "offset_by_one"
    q = "model.layers.0.self_attn.q_proj.weight"
    assert classify(q, w, rope_interleave(w, 4), head_dim=4).relation == "permuted"
    assert classify(q, w, rope_interleave(w, 4, inverse=True), head_dim=4).relation == "permuted"
    # a permutation is read only where RoPE permutes rows (q and k), not on another projection
    assert classify("model.layers.0.self_attn.v_proj.weight", w, rope_interleave(w, 4), head_dim=4).relation == "different"


def test_classifier_reports_how_far_a_different_tensor_is(w):
    moved = w.copy()
    moved[3, 2] += 0.5
    row = classify("x", w, moved)
    assert row.relation == "different"
    assert row.max_abs == pytest.approx(0.5, rel=1e-6)
    assert row.max_rel == pytest.approx(0.5 / np.abs(w).max(), rel=1e-6)
    assert classify("x", w, np.zeros((3, 3))).detail.startswith("shape [3, 3] fits no reading")


def test_the_model_dtype_rounding_counts_as_identical(w):
    assert classify("x", w, w.astype(ml_dtypes.bfloat16), dtype="bf16").relation == "identical"
    assert classify("x", w, w.astype(np.float16).astype(ml_dtypes.bfloat16), dtype="bf16").relation == "rounded_fp16"


# -- planted in the real library -------------------------------------------------------------------
class PlantedHF(HFRunner):
    """transformers loads the checkpoint; then one parameter is cast through fp16, one q projection has its rows
    interleaved within each head (a RoPE-layout conversion bug), one norm scale gets +1."""

    def _open(self):
        super()._open()
        layers = self.model.model.layers
        with torch.no_grad():
            up = layers[2].mlp.up_proj.weight
            up.copy_(up.half().float())
            q = layers[1].self_attn.q_proj.weight
            q.copy_(torch.from_numpy(rope_interleave(q.numpy(), self.spec.head_dim)))
            norm = layers[0].input_layernorm.weight
            norm.add_(1.0)


@pytest.fixture(scope="module")
def planted(tiny):
    ck = tiny["gemma2"]
    with PlantedHF(ck, load_spec(ck), "fp32") as runner:
        return check_runner(runner)


def test_a_planted_fp16_cast_permutation_and_offset_are_named(planted):
    by_name = {r.name: r for r in planted.departures}
    assert by_name["model.layers.2.mlp.up_proj.weight"].relation == "rounded_fp16"
    assert by_name["model.layers.1.self_attn.q_proj.weight"].relation == "permuted"
    assert by_name["model.layers.0.input_layernorm.weight"].relation == "offset_by_one"
    assert len(by_name) == 3  # every other parameter is identical
    assert planted.counts["identical"] == len(planted.rows) - 3
    assert "3 of" in planted.summary()


def test_clean_hf_parameters_are_identical_at_fp32_and_bf16(tiny):
    for impl in ("hf", "hf:bf16"):
        result = check(tiny["llama"], impl, in_process=True)
        assert result.departures == [] and result.counts == {"identical": len(result.rows)} and len(result.rows) > 30


@pytest.fixture(scope="module")
def pool():
    from bughunt.worker import WorkerPool

    with WorkerPool() as p:
        yield p


@pytest.mark.skipif(not HAVE_GEMMA, reason="DeepMind gemma stack not installed")
def test_deepmind_layouts_are_undone_exactly(tiny, pool):
    result = check(tiny["gemma2"], "deepmind", pool=pool)
    assert result.departures == [] and len(result.rows) == 46, result.summary()


# -- the command and compare's section --------------------------------------------------------------
def test_weights_command_exit_codes_and_json(tiny, tmp_path, capsys):
    out = tmp_path / "w.json"
    assert main(["weights", str(tiny["qwen2"]), "--impl", "hf", "--in-process", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == "bughunt.weights" and doc["counts"] == {"identical": doc["checked"]}
    assert "identical" in capsys.readouterr().out
    assert main(["weights", str(tiny["qwen2"]), "--impl", "hf", "--in-process", "--json", str(out)]) == 0  # replaces its own
    foreign = tmp_path / "notes.json"
    foreign.write_text("{}")
    assert main(["weights", str(tiny["qwen2"]), "--impl", "hf", "--json", str(foreign)]) == 2
    assert foreign.read_text() == "{}"
    assert main(["weights", str(tiny["qwen2"]), "--impl", "reference"]) == 2
    assert main(["weights", str(tmp_path / "missing"), "--impl", "hf"]) == 2
    err = capsys.readouterr().err
    assert "does not expose its loaded parameters" in err and "does not exist" in err and "Traceback" not in err


def test_weights_command_exits_1_on_parameters_the_checkpoint_lacks(tiny, tmp_path, capsys):
    import shutil

    ck = tmp_path / "llama-mlp-bias"  # config says the MLP has biases; the weights have none: transformers makes them up
    shutil.copytree(tiny["llama"], ck)
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**config, "mlp_bias": True}))
    assert main(["weights", str(ck), "--impl", "hf", "--in-process"]) == 1
    out = capsys.readouterr().out
    assert "not_in_checkpoint: 12" in out and "model.layers.0.mlp.up_proj.bias" in out


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_KERAS, reason="keras-hub stack not installed")
def test_keras_layouts_are_undone_and_compare_reports_the_fp16_cast(tiny, tmp_path, pool):
    from bughunt.comparison import compare

    assert check(tiny["gemma2"], "keras-jax", pool=pool).departures == []
    result = compare(tiny["mistral"], ["keras-jax", "reference"], out=tmp_path / "report", pool=pool, weight_check=True)
    found = [f for f in result.findings if f["kind"] == "weights"]
    # keras-hub's Mistral converter casts every weight to fp16 (DEVELOPERS.md): 39 of 39 parameters
    assert [f["implementation"] for f in found] == ["keras-jax"] and "39 of 39" in found[0]["message"]
    assert "rounded to fp16" in found[0]["message"]
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<h2>Weights</h2>" in html and "model.layers.0.self_attn.q_proj.weight" in html
