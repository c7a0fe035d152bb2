"""`bughunt tiny FAMILY --trained` (issue 14): the seeded tiny model trained briefly on the shipped text is
deterministic from its seed (byte-identical weights) and has learnt the text."""

import json

from bughunt.cli import main
from bughunt.tiny import make_tiny_checkpoint


def test_trained_tiny_checkpoint_is_deterministic_from_its_seed(tmp_path, capsys):
    assert main(["tiny", "llama", "--trained", "--seed", "3", "--out", str(tmp_path / "cli")]) == 0
    assert "trained 80 steps on tiny_corpus.txt" in capsys.readouterr().out
    make_tiny_checkpoint("llama", tmp_path / "api", seed=3, trained=True)
    make_tiny_checkpoint("llama", tmp_path / "other", seed=4, trained=True)
    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in ("cli", "api", "other")}
    assert weights["cli"] == weights["api"]
    assert weights["cli"] != weights["other"]
    meta = json.loads((tmp_path / "cli" / "bughunt_tiny.json").read_text())["trained"]
    assert meta["loss_last"] < meta["loss_first"] / 4, meta  # it learnt the text
    assert meta["corpus_tokens"] > 1000


def test_training_leaves_torch_settings_as_they_were(tmp_path):
    import torch

    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    make_tiny_checkpoint("qwen3", tmp_path / "q", seed=0, trained=True)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before
