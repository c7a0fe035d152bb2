"""Exit codes mean one thing in every command: 0 compared and within thresholds, 1 a finding or regression where the
command gates on it, 2 bad input or nothing could be compared (130/143 for SIGINT/SIGTERM: tests/test_out_policy.py).
Refused flags, absent devices and runs in which no candidate could be compared are named cases of the bad-input
corpus: exit 2, one message, no traceback, nothing written."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from badinput import assert_refused
from bughunt.cli import EXIT_CODES, build_parser, main

FAST = ["--impl", "reference:fp32", "--impl", "reference", "--in-process"]
DEPARTING = "reference:fp32[rms_eps=0.5]"  # the reference with a wrong epsilon: departs at layer.0.attn
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so --device cuda is not refused")


@dataclass(frozen=True)
class Case:
    """A named bad-input case: argv (with {ck}, {tmp} filled in per test), the message expected, watched paths."""

    name: str
    argv: tuple[str, ...]
    message: str
    watch: tuple[str, ...] = ("{ck}", "{tmp}")
    marks: tuple = ()


MATRIX = ('implementations = ["{impl}"]\ndtypes = ["fp32"]\ndevices = ["{device}"]\ntokens = {{ length = 8, seed = 0 }}\n'
          '[[checkpoints]]\nname = "llama"\npath = "{ck}"\n')

CASES = [
    # flags that cannot mean anything
    Case("compare-timeout-negative", ("compare", "{ck}", *FAST, "--timeout", "-5", "--out", "{tmp}/out"),
         r"--timeout: must be a positive number of seconds.*'-5'"),
    Case("compare-timeout-zero", ("compare", "{ck}", *FAST, "--timeout", "0", "--out", "{tmp}/out"), r"--timeout: must be a positive number"),
    Case("compare-timeout-nan", ("compare", "{ck}", *FAST, "--timeout", "nan", "--out", "{tmp}/out"), r"--timeout: must be a positive number"),
    Case("compare-timeout-infinite", ("compare", "{ck}", *FAST, "--timeout", "inf", "--out", "{tmp}/out"), r"--timeout: must be a positive number"),
    Case("compare-timeout-a-word", ("compare", "{ck}", *FAST, "--timeout", "soon", "--out", "{tmp}/out"), r"--timeout: must be a positive number"),
    Case("tiny-seed-negative", ("tiny", "llama", "--seed", "-5", "--out", "{tmp}/out"), r"--seed: must be a non-negative integer"),
    Case("tiny-seed-a-float", ("tiny", "llama", "--seed", "1.5", "--out", "{tmp}/out"), r"--seed: must be a non-negative integer"),
    Case("tiny-unknown-family", ("tiny", "gpt7", "--out", "{tmp}/out"), r"no tiny checkpoint for family 'gpt7'"),
    # a device this machine does not have: refused up front, not a failed implementation
    Case("compare-device-cuda-without-cuda", ("compare", "{ck}", *FAST, "--device", "cuda", "--out", "{tmp}/out"),
         r"--device cuda was asked for, but torch sees no CUDA device", marks=(no_cuda,)),
    Case("sweep-device-cuda-without-cuda", ("sweep", "{ck}", "--impl", "reference:fp32", "--device", "cuda", "--out", "{tmp}/out"),
         r"--device cuda was asked for, but torch sees no CUDA device", marks=(no_cuda,)),
    Case("decode-device-cuda-without-cuda", ("decode", "{ck}", "--impl", "reference:fp32", "--device", "cuda", "--out", "{tmp}/out"),
         r"--device cuda was asked for, but torch sees no CUDA device", marks=(no_cuda,)),
    Case("ci-matrix-device-cuda-without-cuda", ("ci", "{tmp}/cuda.toml", "--baseline", "{tmp}/bl", "--update-baseline", "--out", "{tmp}/out"),
         r"checkpoint llama: devices cuda was asked for, but torch sees no CUDA device", marks=(no_cuda,)),
    # nothing could be compared
    Case("compare-only-the-reference", ("compare", "{ck}", "--impl", "reference", "--in-process", "--out", "{tmp}/out"),
         r"nothing to compare: only the reference reference was given"),
    Case("compare-only-candidate-refused", ("compare", "{ck}", "--impl", "deepmind", "--impl", "reference", "--in-process", "--out", "{tmp}/out"),
         r"nothing could be compared: every candidate failed or was refused \(deepmind: "),
    Case("compare-only-candidate-failed", ("compare", "{ck}", "--impl", "hf@/nonexistent/python", "--impl", "reference", "--out", "{tmp}/out"),
         r"nothing could be compared: .*could not start worker with interpreter /nonexistent/python"),
    Case("compare-every-candidate-failed", ("compare", "{ck}", "--impl", "hf@/nonexistent/python", "--impl", "deepmind", "--impl", "reference",
                                            "--out", "{tmp}/out"), r"nothing could be compared: .*hf@/nonexistent/python: .*; deepmind: "),
    Case("sweep-candidate-refused", ("sweep", "{ck}", "--impl", "deepmind", "--toggle", "rms_eps=1e-5", "--out", "{tmp}/out"),
         r"deepmind"),
    Case("decode-candidate-refused", ("decode", "{ck}", "--impl", "deepmind", "--out", "{tmp}/out"), r"deepmind"),
    # bad input to the other commands
    Case("lint-missing-checkpoint", ("lint", "{tmp}/absent", "--json", "{tmp}/lint.json"), r"does not exist"),
    Case("render-missing-result", ("render", "{tmp}/absent", "--out", "{tmp}/out"), r"no result at .*absent"),
]


def _fill(text: str, ck: Path, tmp: Path) -> str:
    return text.replace("{ck}", str(ck)).replace("{tmp}", str(tmp))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny):
    ck = tmp_path_factory.mktemp("ck") / "llama"
    shutil.copytree(tiny["llama"], ck)
    return ck


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=c.marks) for c in CASES])
def test_refused_with_exit_2(case, tmp_path, checkpoint, capsys):
    (tmp_path / "cuda.toml").write_text(MATRIX.format(impl="reference", device="cuda", ck=checkpoint.as_posix()))
    argv = [_fill(a, checkpoint, tmp_path) for a in case.argv]
    assert_refused(capsys, argv, case.message, watch=[Path(_fill(w, checkpoint, tmp_path)) for w in case.watch])


def test_compare_exits_0_with_a_finding_and_1_when_it_gates_on_findings(tmp_path, checkpoint, capsys):
    argv = ["compare", str(checkpoint), "--impl", DEPARTING, "--impl", "reference", "--in-process"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert "departs from reference at layer.0.attn" in capsys.readouterr().out
    assert main(argv + ["--out", str(tmp_path / "b"), "--fail-on-finding"]) == 1
    assert main(["compare", str(checkpoint), *FAST, "--out", str(tmp_path / "c"), "--fail-on-finding"]) == 0


def test_one_failed_candidate_beside_a_compared_one_is_a_finding_not_bad_input(tmp_path, checkpoint):
    argv = ["compare", str(checkpoint), "--impl", "deepmind", "--impl", "reference:fp32", "--impl", "reference", "--in-process"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert main(argv + ["--out", str(tmp_path / "b"), "--fail-on-finding"]) == 1


def test_sweep_and_decode_gate_on_findings_when_asked(tmp_path, checkpoint):
    sweep = ["sweep", str(checkpoint), "--impl", "reference:fp32", "--candidate-toggle", "rms_eps=0.5", "--toggle", "rms_eps=1e-5"]
    assert main(sweep + ["--out", str(tmp_path / "s0")]) == 0
    assert main(sweep + ["--out", str(tmp_path / "s1"), "--fail-on-finding"]) == 1
    decode = ["decode", str(checkpoint), "--impl", "reference:fp32", "--tokens", "2,17,99,5,200"]
    assert main(decode + ["--out", str(tmp_path / "d0"), "--fail-on-finding"]) == 0
    assert main(decode + ["--reference", DEPARTING, "--out", str(tmp_path / "d1"), "--fail-on-finding"]) == 1


def test_ci_exits_2_when_no_cell_could_be_compared(tmp_path, checkpoint, capsys):
    matrix = tmp_path / "m.toml"
    matrix.write_text(MATRIX.format(impl="hf@/nonexistent/python", device="cpu", ck=checkpoint.as_posix()))
    out = tmp_path / "out"
    assert main(["ci", str(matrix), "--baseline", str(tmp_path / "bl"), "--update-baseline", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "nothing could be compared: every cell of the matrix failed" in err and "Traceback" not in err
    errors = ET.parse(out / "junit.xml").getroot().findall(".//error")
    assert len(errors) == 1 and "could not start worker" in errors[0].get("message")  # CI still gets its JUnit file
    assert not (tmp_path / "bl").exists()  # no baseline recorded from a cell that never ran


@pytest.mark.parametrize("command", ["compare", "sweep", "decode", "lint", "ci", "render", "tiny", "demo"])
def test_every_commands_help_states_the_exit_codes(command, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert " ".join(EXIT_CODES.split()) in " ".join(text.split())
    for line in ("0    compared, and within thresholds", "1    a finding or regression", "2    bad input",
                 "130  interrupted by SIGINT"):
        assert line in text


def test_the_readme_states_the_same_exit_codes():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for code, meaning in [("0", "compared, and within thresholds"), ("1", "a finding or regression"), ("2", "bad input"),
                          ("130", "SIGINT"), ("143", "SIGTERM")]:
        assert any(line.startswith(f"| {code} ") and meaning in line for line in readme.splitlines()), (code, meaning)

