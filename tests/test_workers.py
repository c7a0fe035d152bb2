"""Worker processes: implementations run in their own processes, another interpreter can be named, and a crash,
a hang or a missing library is a failed implementation in result.json and the report, never a failed run."""

import os
import stat
import subprocess
import sys

import pytest

from bughunt.cli import main
from bughunt.comparison import compare
from bughunt.result import Result


def fake_interpreter(tmp_path, name, body):
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_implementations_run_in_worker_processes_and_agree_with_in_process_runs(tiny, tokens):
    isolated = compare(tiny["qwen2"], ["hf", "reference"], tokens=tokens)
    inproc = compare(tiny["qwen2"], ["hf", "reference"], tokens=tokens, isolate=False)
    entry = next(e for e in isolated.data["implementations"] if e["label"] == "hf")
    assert entry["isolation"] == "worker" and entry["meta"]["worker"]["pid"] != os.getpid()
    assert [p["rel_l2"] for p in isolated.comparison("hf")["points"]] == [p["rel_l2"] for p in inproc.comparison("hf")["points"]]


@pytest.mark.slow
def test_same_implementation_across_two_interpreters(tmp_path, tiny):
    # The cross-version question (transformers X vs Y): here the second interpreter is this one, named explicitly.
    out = tmp_path / "xver"
    code = main(["compare", str(tiny["llama"]), "--impl", "hf", "--impl", f"hf@{sys.executable}", "--reference", "hf",
                 "--dtype", "fp32", "--out", str(out)])
    assert code == 0
    result = Result.load(out)
    other = next(e for e in result.data["implementations"] if e["label"] == f"hf@{sys.executable}")
    assert other["status"] == "ok" and other["python"] == sys.executable
    points = result.comparison(f"hf@{sys.executable}")["points"]
    assert all(p["rel_l2"] == 0.0 for p in points)  # same library, same inputs: bit-identical


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["crash", "hang", "missing-library"])
def test_a_failing_worker_is_a_failed_implementation_and_the_others_are_intact(kind, tmp_path, tiny):
    if kind == "crash":
        python = fake_interpreter(tmp_path, "crashing-python", "echo 'Fatal Python error: Segmentation fault' >&2; exit 139")
        expect = "exited with code 139"
    elif kind == "hang":
        python = fake_interpreter(tmp_path, "hanging-python", "exec sleep 600")
        expect = "timed out after 20 s"
    else:  # a bare virtual environment: no numpy, no torch
        env_dir = tmp_path / "bare-venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
        python = str(env_dir / "bin" / "python")
        expect = "No module named"
    out = tmp_path / "run"
    code = main(["compare", str(tiny["gemma"]), "--impl", "hf", "--impl", f"hf@{python}", "--impl", "reference",
                 "--timeout", "20" if kind == "hang" else "120", "--out", str(out)])
    assert code == 0
    result = Result.load(out)
    result.validate()
    bad = next(e for e in result.data["implementations"] if e["label"] == f"hf@{python}")
    assert bad["status"] == "failed" and expect in bad["error"]
    assert any(f["kind"] == "failure" and f["implementation"] == bad["label"] for f in result.findings)
    assert result.comparison("hf")["first_above_floor"] is None  # the healthy implementation's result is intact
    html = (out / "report.html").read_text()
    assert "failed" in html and expect in html
