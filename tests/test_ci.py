"""`bughunt ci`: a matrix file run against stored baselines. Exit 0 pass, 1 regression, 2 bad input; JUnit XML,
Markdown summary and HTML reports; baselines that are byte-identical across runs. Real libraries, tiny checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from bughunt.ci import diagnosis_text, load_matrix
from bughunt.cli import main
from bughunt.result import Result
from bughunt.tiny import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]

MATRIX = """
implementations = ["hf"]
dtypes = ["fp32", "bf16"]
tokens = {{ length = 8, seed = 0 }}

[[checkpoints]]
name = "llama"
path = "{path}"
{extra}
"""


def write_matrix(directory: Path, checkpoint: Path, extra: str = "") -> Path:
    path = directory / "bughunt.toml"
    path.write_text(MATRIX.format(path=checkpoint.as_posix(), extra=extra))
    return path


def junit(out: Path) -> tuple[list[ET.Element], list[ET.Element]]:
    root = ET.parse(out / "junit.xml").getroot()
    cases = root.findall(".//testcase")
    return cases, [f for c in cases for f in c.findall("failure") + c.findall("error")]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A clean tiny llama checkpoint at a path, its matrix, and baselines recorded from it."""
    d = tmp_path_factory.mktemp("recorded")
    checkpoint = make_tiny_checkpoint("llama", d / "llama", seed=0)
    matrix = write_matrix(d, checkpoint)
    assert main(["ci", str(matrix), "--baseline", str(d / "baselines"), "--update-baseline", "--out", str(d / "record")]) == 0
    return d, checkpoint, matrix


@pytest.mark.slow
def test_clean_matrix_passes_and_writes_every_output(recorded, tmp_path):
    d, _, matrix = recorded
    out = tmp_path / "out"
    assert main(["ci", str(matrix), "--baseline", str(d / "baselines"), "--out", str(out)]) == 0
    cases, failures = junit(out)
    assert [c.get("name") for c in cases] == ["llama/hf:fp32/cpu", "llama/hf:bf16/cpu"]
    assert failures == []
    summary = (out / "summary.md").read_text()
    assert "all 2 cells pass" in summary and "| `llama/hf:bf16/cpu` | ✅ pass |" in summary
    assert "report.html" in (out / "index.html").read_text()
    assert "CI gate" in (out / "reports" / "llama-cpu" / "report.html").read_text()


@pytest.mark.slow
def test_baselines_are_byte_identical_across_runs(recorded, tmp_path):
    d, _, matrix = recorded
    assert main(["ci", str(matrix), "--baseline", str(tmp_path / "again"), "--update-baseline", "--out", str(tmp_path / "out")]) == 0
    first = sorted((d / "baselines").iterdir())
    second = sorted((tmp_path / "again").iterdir())
    assert [p.name for p in first] == [p.name for p in second] == ["llama__hf-bf16__cpu.json", "llama__hf-fp32__cpu.json"]
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name
    text = first[1].read_text()
    assert '"cell": "llama/hf:fp32/cpu"' in text and "time" not in text and str(d) not in text


@pytest.mark.slow
def test_planted_regression_fails_naming_cell_and_capture_point(recorded, tmp_path):
    """Baselines from the clean checkpoint; then the checkpoint is regenerated with mlp_bias = true, a config
    field HF honours and the reference does not read, so the two part at layer 0's MLP. End to end, in a subprocess."""
    d, _, _ = recorded
    planted = make_tiny_checkpoint("llama", tmp_path / "llama", seed=0, config_overrides={"mlp_bias": True})
    matrix = write_matrix(tmp_path, planted)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "bughunt.cli", "ci", str(matrix), "--baseline", str(d / "baselines"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "cell llama/hf:fp32/cpu: layer.0.mlp rel_l2" in proc.stdout
    assert "vs baseline" in proc.stdout and "limit 10x + 1e-06" in proc.stdout
    cases, failures = junit(out)
    assert len(cases) == 2 and len(failures) == 2
    messages = [f.get("message") for f in failures]
    assert messages[0].startswith("cell llama/hf:fp32/cpu: layer.0.mlp rel_l2 ")
    assert messages[1].startswith("cell llama/hf:bf16/cpu: layer.0.mlp rel_l2 ")
    summary = (out / "summary.md").read_text()
    assert "2 of 2 cells fail" in summary and "| `llama/hf:fp32/cpu` | ❌ regression | layer.0.mlp |" in summary


@pytest.mark.parametrize("rule, expect", [
    ('metric = "rel_l2"\npoints = "layer.*"\nmax = 1e-9', "layer.0 rel_l2"),
    ('metric = "rel_l2"\nsummary = "max"\npoints = "layer.*"\nmax = 1e-9', "max over layer.* (at "),
    ('metric = "rel_l2"\ncells = "*/hf:fp32/*"\nfloor_factor = 0.1', "the fp32 noise floor"),
    ('metric = "cosine"\npoints = "final_norm"\nmin = 1.5', "final_norm cosine"),
])
@pytest.mark.slow
def test_absolute_and_floor_thresholds(recorded, tmp_path, capsys, rule, expect):
    d, checkpoint, _ = recorded
    matrix = write_matrix(tmp_path, checkpoint, extra=f"\n[[thresholds]]\n{rule}\n")
    assert main(["ci", str(matrix), "--baseline", str(d / "baselines"), "--out", str(tmp_path / "out")]) == 1
    assert expect in capsys.readouterr().out


def test_missing_baseline_is_bad_input(recorded, tmp_path, capsys):
    _, checkpoint, _ = recorded
    matrix = write_matrix(tmp_path, checkpoint)
    (tmp_path / "empty").mkdir()
    for baseline in (tmp_path / "empty", tmp_path / "absent"):
        assert main(["ci", str(matrix), "--baseline", str(baseline), "--out", str(tmp_path / "out")]) == 2
        assert "--update-baseline" in capsys.readouterr().err


def test_baseline_from_other_tokens_is_bad_input(recorded, tmp_path, capsys):
    d, checkpoint, _ = recorded
    matrix = tmp_path / "m.toml"
    matrix.write_text(MATRIX.format(path=checkpoint.as_posix(), extra="").replace("length = 8", "length = 9"))
    assert main(["ci", str(matrix), "--baseline", str(d / "baselines"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "different input tokens" in err and "--update-baseline" in err


MALFORMED = [
    ('dtype = ["fp32"]\n[[checkpoints]]\ntiny = "llama"', "unknown key 'dtype'. Did you mean 'dtypes'?"),
    ('dtypes = "fp32"\n[[checkpoints]]\ntiny = "llama"', "dtypes must be a non-empty list of strings"),
    ('dtypes = ["bf32"]\n[[checkpoints]]\ntiny = "llama"', "dtypes[0]: 'bf32' is not a dtype"),
    ('implementations = ["hf:fp32"]\n[[checkpoints]]\ntiny = "llama"', "put the dtypes in dtypes = [...]"),
    ('implementations = ["vllm"]\n[[checkpoints]]\ntiny = "llama"', "unknown implementation 'vllm'"),
    ('[[checkpoints]]\ntiny = "llama"\npath = "x"', "give exactly one of path"),
    ('[[checkpoints]]\ntiny = "gpt2"', "no tiny checkpoint for family 'gpt2'"),
    ('[[checkpoints]]\ntiny = "llama"\nseed = "0"', "checkpoints[0].seed must be an integer"),
    ('[[checkpoints]]\npath = "does-not-exist"', "is not a directory"),
    ('tokens = { ids = [[2, 3], [4]] }\n[[checkpoints]]\ntiny = "llama"', "every row must have the same length"),
    ('tokens = { length = 8, ids = [1] }\n[[checkpoints]]\ntiny = "llama"', "give either ids, or length and seed"),
    ('reference = "hf"\n[[checkpoints]]\ntiny = "llama"', "give the reference a dtype"),
    ('implementations = []', "implementations must be a non-empty list"),
    ('dtypes = ["fp32"]', "no checkpoints"),
    ('[[checkpoints]]\ntiny = "llama"\n[[thresholds]]\npoints = "*"\nmax = 1', "missing key 'metric'"),
    ('[[checkpoints]]\ntiny = "llama"\n[[thresholds]]\nmetric = "rel_l3"\nmax = 1', "unknown metric 'rel_l3'. Did you mean 'rel_l2'?"),
    ('[[checkpoints]]\ntiny = "llama"\n[[thresholds]]\nmetric = "rel_l2"', "no limit given"),
    ('[[checkpoints]]\ntiny = "llama"\n[[thresholds]]\nmetric = "kl"\npoints = "layer.*"\nmax = 1', "exists only at the logits"),
    ('[[checkpoints]]\ntiny = "llama"\n[[thresholds]]\nmetric = "kl"\nfloor_factor = 10', "use it with metric = \"rel_l2\""),
    ('[[checkpoints]]\ntiny = "llama"\n[[thresholds]]\nmetric = "rel_l2"\nmax = "1e-3"', "thresholds[0].max must be a finite number"),
    ('[[checkpoints]]\ntiny = "llama"\n[[thresholds]]\nmetric = "rel_l2"\nslack = 1e-6', "no limit given"),
    ('[[checkpoints]]\ntiny = "llama"\n[[thresholds]]\nmetric = "rel_l2"\npoints = "layers.*"\nmax = 1', "matches no capture point"),
    ('[[checkpoints]\ntiny = "llama"', "is not valid TOML"),
]


@pytest.mark.parametrize("text, expect", MALFORMED, ids=[m[1][:40] for m in MALFORMED])
def test_malformed_matrix_is_bad_input_with_a_useful_message(tmp_path, capsys, text, expect):
    matrix = tmp_path / "bad.toml"
    matrix.write_text(text + "\n")
    assert main(["ci", str(matrix), "--baseline", str(tmp_path / "b"), "--update-baseline", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert expect in err, err
    assert not (tmp_path / "b").exists()  # nothing ran, nothing was recorded


def test_example_matrix_is_valid():
    matrix = load_matrix(ROOT / "examples" / "bughunt.toml")
    assert [c.name for c in matrix.checkpoints] == ["llama", "gemma2-seed1", "gemma2-every-path", "my-model"]
    assert len(matrix.thresholds) == 7


def test_diagnosis_is_read_from_the_result_when_present():
    assert diagnosis_text(Result({"diagnosis": None}), "hf:fp32") is None
    assert diagnosis_text(Result({"diagnosis": "gelu=tanh explains it"}), "hf:fp32") == "gelu=tanh explains it"
    keyed = Result({"diagnosis": {"hf:fp32": {"message": "rope_dtype=model explains 97%"}}})
    assert diagnosis_text(keyed, "hf:fp32") == "rope_dtype=model explains 97%"


@pytest.mark.slow
def test_project_matrix_passes_against_committed_baselines(tmp_path):
    """The project's own gate: the tiny checkpoint of every family, hf at fp32 and bf16, against baselines/."""
    out = tmp_path / "out"
    code = main(["ci", str(ROOT / "bughunt.toml"), "--baseline", str(ROOT / "baselines"), "--out", str(out)])
    assert code == 0, (out / "summary.md").read_text()
    cases, failures = junit(out)
    assert len(cases) == 16 and failures == []
    assert not (tmp_path / "baselines").exists()
