"""bughunt lint on the real trained SmolLM2-135M (the `smollm2` fixture): no check cries wolf. The model was trained
without BOS and its tokenizer adds none, which the measured loss confirms; pad == eos is reported as info only."""

from __future__ import annotations

import json
import shutil

import pytest

from bughunt.cli import main
from bughunt.lint import format_table, lint

pytestmark = pytest.mark.slow  # each lint runs two float64 passes of the 135M model (11 s on 2 idle cores)


def test_real_model_lints_without_error_and_states_the_measurement(smollm2, tmp_path, capsys):
    out = tmp_path / "lint.json"
    assert main(["lint", str(smollm2), "--json", str(out)]) == 0, capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["summary"]["error"] == 0 and doc["summary"]["exit_code"] == 0
    checks = {c["id"]: c for c in doc["checks"]}
    # Measured, not assumed: the no-BOS tokenizer is no worse than BOS first, and the note says by how much.
    for cid in ("tokenizer-no-bos", "tokenizer-bos-unwanted"):
        assert checks[cid]["status"] == "passed", checks[cid]
        assert "nats/token with BOS" in checks[cid]["reason"] and "the tokenizer's convention (no BOS)" in checks[cid]["reason"]
    assert checks["tokenizer-bos-unmeasured"]["status"] == "skipped"
    pad = [f for f in doc["findings"] if f["check"] == "pad-equals-eos"]
    assert pad and all(f["severity"] == "info" for f in pad) and "harmless for a single unpadded sequence" in pad[0]["message"]


def test_a_bos_the_real_model_barely_minds_is_not_an_error(smollm2, tmp_path):
    """The tokenizer made to prepend <|im_start|> (config.json's bos_token_id): the weights do slightly worse (0.04
    nats/token, measured), below the clear margin, so lint records the figures and raises nothing."""
    d = tmp_path / "smollm2-bos"
    d.mkdir()
    for f in smollm2.iterdir():
        if f.suffix == ".safetensors":
            (d / f.name).symlink_to(f.resolve())
        elif f.is_file():
            shutil.copy(f, d / f.name)
    tok = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    bos = json.loads((d / "config.json").read_text())["bos_token_id"]
    name = next(t["content"] for t in tok["added_tokens"] if t["id"] == bos)
    tok["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": name, "type_id": 0}},
                                                                      {"Sequence": {"id": "A", "type_id": 0}}],
                             "pair": [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                      {"Sequence": {"id": "B", "type_id": 1}}],
                             "special_tokens": {name: {"id": name, "ids": [bos], "tokens": [name]}}}
    (d / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    report = lint(d)
    assert report.exit_code == 0, format_table(report)
    note = next(c["reason"] for c in report.checks if c["id"] == "tokenizer-bos-unwanted")
    assert f"the tokenizer's convention (BOS '{name}' (id {bos})) is worse by" in note, note
