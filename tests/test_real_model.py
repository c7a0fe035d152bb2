"""The real trained model bughunt ships (SmolLM2-135M-Instruct, a Q4_1 GGUF from requirements/real.txt): its view is a
faithful checkpoint, its loss on real text is a trained model's, and every installed implementation runs it."""

import numpy as np
import pytest

from bughunt import sources
from bughunt.implementations import REGISTRY, available, supports
from bughunt.spec import load_spec
from bughunt.text import TextRequest


def corpus_request(words: int) -> TextRequest:
    from pathlib import Path

    import bughunt

    text = (Path(bughunt.__file__).parent / "data" / "tiny_corpus.txt").read_text()
    return TextRequest(prompts=(" ".join(text.split()[:words]),), sources=("tiny_corpus.txt",))


def test_the_real_model_is_found_through_its_distribution_and_read_as_a_llama(smollm2_gguf, smollm2):
    assert smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm2_gguf.stat().st_size > 90e6
    spec = load_spec(smollm2)
    assert (spec.family, spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.vocab_size) == \
        ("llama", 30, 576, 9, 3, 49152)
    assert spec.tie_word_embeddings and spec.rope["full"].theta == 100000.0
    record = sources.describe(smollm2)
    assert record["kind"] == "gguf" and record["file_type"] == "q4_1"
    assert record["tensor_types"] == {"Q4_1": 210, "Q8_0": 1, "F32": 61}


@pytest.mark.slow
def test_the_loss_on_real_text_is_a_trained_models_and_hf_matches_the_reference_on_it(smollm2):
    from bughunt.comparison import compare

    result = compare(smollm2, ["hf", "reference"], dtype="fp32", text=corpus_request(160), render=False)
    logits = next(p for p in result.comparison("hf")["points"] if p["point"] == "logits")
    n = result.data["inputs"]["tokens"][0]
    assert len(n) >= 150
    uniform = float(np.log(49152))
    assert 1.0 < logits["nll_reference"] < 4.0 < uniform, logits["nll_reference"]  # chance would be 10.8 nats/token
    assert abs(logits["nll"] - logits["nll_reference"]) < 1e-4
    assert result.comparison("hf")["first_above_floor"] is None


@pytest.mark.slow
def test_every_installed_implementation_runs_the_real_model(smollm2_gguf):
    """Each implementation that supports llama and is installed here (make test installs them all) completes; the
    GGUF file itself is the checkpoint, so llamacpp runs it at q4_1."""
    from bughunt.comparison import compare
    from bughunt.envs import own_python

    names = [n for n in REGISTRY if n != "reference" and supports(n, "llama") and (available(n) or n == "litgpt")]
    if "litgpt" in names and own_python("litgpt") is None:  # its own environment (make litgpt) is not built here
        names.remove("litgpt")
    result = compare(smollm2_gguf, names + ["reference"], dtype="fp32", text=corpus_request(6), render=False)
    ran = {e["name"]: e for e in result.data["implementations"]}
    assert set(names) <= set(ran)
    failed = {n: ran[n]["error"] for n in names if ran[n]["status"] != "ok"}
    assert not failed, failed
    if "llamacpp" in ran:
        assert ran["llamacpp"]["label"] == "llamacpp:q4_1"
