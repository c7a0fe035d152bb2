"""The `--out` policy: no command that writes can lose data. Every writing command refuses a file, the checkpoint,
a path inside the checkpoint, a non-empty directory bughunt did not write and a place it cannot create, before any
work starts (exit 2, one message, watched paths unchanged); bughunt's own earlier output is replaced atomically;
outputs follow the umask; SIGINT/SIGTERM leave no workers, no temporary folders and nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from badinput import assert_refused, snapshot
from bughunt.cli import main
from bughunt.errors import BughuntError
from bughunt.interrupt import Interrupted, deferred, handled
from bughunt.output import MARKER, read_marker, write_output_dir, write_output_file

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--impl", "reference:fp32", "--impl", "reference", "--in-process"]  # a candidate that needs no torch, in-process


@dataclass(frozen=True)
class Case:
    """One bad-input case of the corpus. argv and watch hold {ck} (a checkpoint), {tmp} (the test's directory),
    {report} (a finished bughunt report), {matrix} (a CI matrix), filled in per test."""

    name: str
    argv: tuple[str, ...]
    message: str
    watch: tuple[str, ...]


# Each writing command, with {out} where its output goes.
WRITERS = {
    "compare": ("compare", "{ck}", *FAST, "--out", "{out}"),
    "sweep": ("sweep", "{ck}", "--impl", "reference:fp32", "--toggle", "rms_eps=1e-5", "--out", "{out}"),
    "decode": ("decode", "{ck}", "--impl", "reference:fp32", "--out", "{out}"),
    "render": ("render", "{report}", "--out", "{out}"),
    "ci": ("ci", "{matrix}", "--baseline", "{tmp}/baselines", "--update-baseline", "--out", "{out}"),
    "tiny": ("tiny", "llama", "--out", "{out}"),
    "demo": ("demo", "--family", "llama", "--out", "{out}"),
}
# What --out points at, the message expected, and the paths that must not change.
SITUATIONS = {
    "out-is-a-file": ("{tmp}/user.txt", r"is a file, not a directory", ("{tmp}",)),
    "out-is-the-checkpoint": ("{ck}", r"is the checkpoint", ("{ck}", "{tmp}")),
    "out-inside-the-checkpoint": ("{ck}/report", r"lies inside the checkpoint", ("{ck}", "{tmp}")),
    "out-contains-the-checkpoint": ("{ck}/..", r"contains the checkpoint", ("{ck}", "{tmp}")),
    "out-is-a-foreign-directory": ("{tmp}/mine", r"non-empty directory that bughunt did not write", ("{tmp}",)),
    "out-below-a-file": ("{tmp}/user.txt/report", r"cannot be created: .*user.txt is a file", ("{tmp}",)),
    "out-under-proc": ("/proc/bughunt-report", r"cannot be written: creating anything in /proc fails", ("{tmp}",)),
    "out-under-sys": ("/sys/bughunt-report", r"cannot be written: creating anything in /sys fails", ("{tmp}",)),
    "out-is-own-output-plus-a-user-file": ("{tmp}/own", r"plus files bughunt did not write \(notes.txt\)", ("{tmp}",)),
    "out-is-a-symlink-to-the-checkpoint": ("{tmp}/link-to-ck", r"is the checkpoint", ("{ck}", "{tmp}")),
    "out-is-a-symlink-loop": ("{tmp}/loop", r"is a symbolic link loop", ("{tmp}",)),
    "out-name-too-long": ("{tmp}/" + "x" * 300, r"cannot be used as a path: File name too long", ("{tmp}",)),
    "out-is-empty": ("", r"argument --out: is empty", ("{tmp}",)),
}
NO_CHECKPOINT = {"tiny", "demo"}  # commands that read no checkpoint, so the checkpoint cases do not apply


def _out_cases() -> list[Case]:
    cases = []
    for command, argv in WRITERS.items():
        for situation, (out, message, watch) in SITUATIONS.items():
            if command in NO_CHECKPOINT and "checkpoint" in situation:
                continue
            if command == "tiny" and situation == "out-is-own-output-plus-a-user-file":
                message = r"holds a bughunt compare output, which a tiny run does not replace"
            cases.append(Case(f"{command}-{situation}", tuple(a.replace("{out}", out) for a in argv), message, watch))
    return cases


LINT_CASES = [
    Case("lint-json-is-a-user-file", ("lint", "{ck}", "--json", "{tmp}/user.txt"), r"--json .*user.txt exists and is not a bughunt.lint document", ("{tmp}",)),
    Case("lint-json-is-other-json", ("lint", "{ck}", "--json", "{tmp}/data.json"), r"is not a bughunt.lint document", ("{tmp}",)),
    Case("lint-json-is-a-directory", ("lint", "{ck}", "--json", "{tmp}/mine"), r"--json .*mine is a directory", ("{tmp}",)),
    Case("lint-json-is-the-checkpoint", ("lint", "{ck}", "--json", "{ck}"), r"is a directory", ("{ck}",)),
    Case("lint-json-inside-the-checkpoint", ("lint", "{ck}", "--json", "{ck}/lint.json"), r"lies inside the checkpoint", ("{ck}",)),
    Case("lint-json-overwrites-config", ("lint", "{ck}", "--json", "{ck}/config.json"), r"lies inside the checkpoint", ("{ck}",)),
    Case("lint-json-below-a-file", ("lint", "{ck}", "--json", "{tmp}/user.txt/lint.json"), r"user.txt is a file", ("{tmp}",)),
    Case("lint-json-empty", ("lint", "{ck}", "--json", ""), r"argument --json: is empty", ("{tmp}",)),
    Case("lint-json-through-a-symlink-into-the-checkpoint", ("lint", "{ck}", "--json", "{tmp}/link-to-ck/lint.json"),
         r"lies inside the checkpoint", ("{ck}", "{tmp}")),
    Case("lint-json-name-too-long", ("lint", "{ck}", "--json", "{tmp}/" + "y" * 300 + ".json"), r"File name too long", ("{tmp}",)),
    Case("lint-json-under-proc", ("lint", "{ck}", "--json", "/proc/bughunt/lint.json"), r"cannot be written", ("{tmp}",)),
]
CI_CASES = [
    Case("ci-out-is-the-baseline-directory", ("ci", "{matrix}", "--baseline", "{tmp}/bl", "--update-baseline", "--out", "{tmp}/bl"),
         r"is the baseline directory", ("{tmp}",)),
    Case("ci-baseline-inside-out", ("ci", "{matrix}", "--baseline", "{tmp}/own/bl", "--update-baseline", "--out", "{tmp}/own"),
         r"contains the baseline directory", ("{tmp}",)),
    Case("ci-baseline-is-a-file", ("ci", "{matrix}", "--baseline", "{tmp}/user.txt", "--update-baseline", "--out", "{tmp}/new"),
         r"--baseline .*user.txt is a file", ("{tmp}",)),
    Case("ci-baseline-file-not-a-baseline", ("ci", "{matrix}", "--baseline", "{tmp}/foreign-bl", "--update-baseline", "--out", "{tmp}/new"),
         r"llama__reference-fp32__cpu.json exists and is not a bughunt.baseline document", ("{tmp}",)),
    Case("ci-baseline-inside-the-checkpoint", ("ci", "{matrix}", "--baseline", "{ck}/bl", "--update-baseline", "--out", "{tmp}/new"),
         r"--baseline .* lies inside the checkpoint", ("{ck}", "{tmp}")),
    Case("ci-baseline-empty", ("ci", "{matrix}", "--baseline", "", "--out", "{tmp}/new"), r"argument --baseline: is empty", ("{tmp}",)),
    Case("ci-out-contains-the-matrix", ("ci", "{matrix}", "--baseline", "{tmp}/bl", "--update-baseline", "--out", "{tmp}"),
         r"contains the (checkpoint|matrix file)", ("{tmp}",)),
    Case("render-in-place-of-a-foreign-directory", ("render", "{tmp}/mine/result.json"), r"was not written by bughunt.*--out NEWDIR", ("{tmp}",)),
]
CASES = _out_cases() + LINT_CASES + CI_CASES


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny):
    """A private copy of the tiny llama checkpoint (refusals are checked against it byte for byte)."""
    ck = tmp_path_factory.mktemp("ck") / "llama"
    shutil.copytree(tiny["llama"], ck)
    return ck


@pytest.fixture(scope="module")
def report(tmp_path_factory, checkpoint):
    """A finished bughunt compare report."""
    out = tmp_path_factory.mktemp("report") / "run"
    assert main(["compare", str(checkpoint), *FAST, "--out", str(out)]) == 0
    return out


def _fill(text: str, **paths: Path) -> str:
    for key, value in paths.items():
        text = text.replace("{" + key + "}", str(value))
    return text


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_an_out_bughunt_must_not_write_is_refused_before_any_work(case, tmp_path, checkpoint, report, capsys):
    # What a user might have lying about: a file, their own directory, bughunt's output with their notes added,
    # a JSON file of their own, a baseline directory holding a file that is not a baseline.
    (tmp_path / "user.txt").write_text("my notes\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine\n")
    shutil.copy(report / "result.json", tmp_path / "mine" / "result.json")  # a user's copy of a result, beside their notes
    (tmp_path / "data.json").write_text('{"schema": "something.else"}')
    (tmp_path / "foreign-bl").mkdir()
    (tmp_path / "foreign-bl" / "llama__reference-fp32__cpu.json").write_text('{"mine": true}')
    (tmp_path / "link-to-ck").symlink_to(checkpoint, target_is_directory=True)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    shutil.copytree(report, tmp_path / "own")
    (tmp_path / "own" / "notes.txt").write_text("added by hand\n")
    matrix = tmp_path / "m.toml"
    matrix.write_text(f'implementations = ["reference"]\ndtypes = ["fp32"]\ntokens = {{ length = 8, seed = 0 }}\n'
                      f'[[checkpoints]]\nname = "llama"\npath = "{checkpoint.as_posix()}"\n')
    paths = {"ck": checkpoint, "tmp": tmp_path, "report": report, "matrix": matrix}
    argv = [_fill(a, **paths) for a in case.argv]
    watch = [Path(_fill(w, **paths)) for w in case.watch] + [report]
    assert_refused(capsys, argv, case.message, watch=watch)
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.")]


def test_a_second_compare_replaces_only_bughunts_own_earlier_output(tmp_path, checkpoint, capsys):
    (tmp_path / "keep.txt").write_text("beside the output\n")
    out = tmp_path / "run"
    assert main(["decode", str(checkpoint), "--impl", "reference:fp32", "--tokens", "2,17,99,5,200", "--out", str(out)]) == 0
    assert (out / "decode.png").exists() and read_marker(out)["kind"] == "decode"
    first = capsys.readouterr().out
    assert f"wrote {out}: " in first and "layers.png" not in first  # only what was written is listed
    assert main(["compare", str(checkpoint), *FAST, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    written = sorted(p.name for p in out.iterdir() if p.name != MARKER)
    assert printed == f"wrote {out}: " + ", ".join(f"{n}/ (4 files)" if n == "traces" else n for n in written)
    assert not (out / "decode.png").exists()  # nothing of the earlier output survives beside the new one
    marker = read_marker(out)
    assert marker["kind"] == "compare" and "result.json" in marker["files"] and "traces/reference.safetensors" in marker["files"]
    assert (tmp_path / "keep.txt").read_text() == "beside the output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "run"]  # no temporary or old siblings


def test_an_empty_directory_is_used_and_missing_parents_are_created(tmp_path, checkpoint):
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(checkpoint), *FAST, "--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "result.json").exists()
    assert main(["compare", str(checkpoint), *FAST, "--out", str(tmp_path / "a" / "b" / "run")]) == 0
    assert read_marker(tmp_path / "a" / "b" / "run")["kind"] == "compare"


def test_a_failed_run_leaves_the_earlier_output_and_no_temporary_folder(tmp_path, checkpoint, capsys):
    out = tmp_path / "run"
    assert main(["compare", str(checkpoint), *FAST, "--out", str(out)]) == 0
    before = snapshot([out])
    assert_refused(capsys, ["compare", str(checkpoint), *FAST, "--tokens", "1,2,99999", "--out", str(out)], r"token ids must lie")
    assert snapshot([out]) == before

    def broken(tmp: Path) -> None:
        (tmp / "half.json").write_text("{")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_output_dir(out, "compare", broken)
    assert snapshot([out]) == before
    with pytest.raises(BughuntError, match="cannot be created"):
        write_output_dir(tmp_path / "run" / "result.json" / "x", "compare", broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    made = tmp_path / "new" / "deeper" / "run"
    with pytest.raises(RuntimeError):
        write_output_dir(made, "compare", broken)
    assert not (tmp_path / "new").exists()  # parents it created for a run that failed are removed again


def test_an_interrupt_while_writing_leaves_the_earlier_output_whole(tmp_path, checkpoint):
    out = tmp_path / "run"
    assert main(["compare", str(checkpoint), *FAST, "--out", str(out)]) == 0
    before = snapshot([out])

    def interrupted(tmp: Path) -> None:
        (tmp / "result.json").write_text("{")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here

    with handled(), pytest.raises(Interrupted) as exc:
        write_output_dir(out, "compare", interrupted)
    assert exc.value.exit_code == 143
    assert snapshot([out]) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_signal_inside_a_critical_section_is_held_until_it_ends(tmp_path):
    done = []
    with handled(), pytest.raises(Interrupted) as exc:
        with deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            done.append("moved into place")
    assert done == ["moved into place"] and exc.value.exit_code == 130


def test_lint_json_replaces_its_own_document_atomically(tmp_path, checkpoint):
    out = tmp_path / "lint.json"
    code = main(["lint", str(checkpoint), "--json", str(out)])
    assert code in (0, 1) and json.loads(out.read_text())["schema"] == "bughunt.lint"
    out.write_text(out.read_text().replace('"checks"', '"checks_old"', 1))
    assert main(["lint", str(checkpoint), "--json", str(out)]) == code
    assert '"checks"' in out.read_text() and sorted(p.name for p in tmp_path.iterdir()) == ["lint.json"]


def test_render_writes_a_fresh_output_in_place_and_elsewhere(tmp_path, report, capsys):
    src = tmp_path / "run"
    shutil.copytree(report, src)
    capsys.readouterr()
    assert main(["render", str(src)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {src}: heatmap.png, layers.png, layers.svg, loss.png, positions.png, report.html, result.json, traces/ (4 files)"
    assert read_marker(src)["kind"] == "render"
    assert (src / "result.json").read_text() == (report / "result.json").read_text()
    assert main(["render", str(src / "result.json"), "--out", str(tmp_path / "copy")]) == 0
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == sorted(p.name for p in src.iterdir())


def test_tiny_replaces_its_own_checkpoint_and_refuses_a_negative_seed(tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["tiny", "llama", "--out", str(out), "--seed", "1"]) == 0
    assert read_marker(out)["kind"] == "tiny" and json.loads((out / "bughunt_tiny.json").read_text())["seed"] == 1
    assert main(["tiny", "llama", "--out", str(out), "--seed", "2"]) == 0
    assert json.loads((out / "bughunt_tiny.json").read_text())["seed"] == 2
    assert_refused(capsys, ["tiny", "llama", "--out", str(tmp_path / "neg"), "--seed", "-1"], r"--seed: must be a non-negative integer",
                   watch=[tmp_path])


@pytest.mark.slow
@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_outputs_follow_the_umask(mask, tmp_path, checkpoint):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "bughunt.cli", "compare", str(checkpoint), *FAST, "--out", str(out)], umask=mask,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) >= 8 and any(p.suffix == ".safetensors" for p in files)
    for d in (out, out / "traces"):
        assert d.stat().st_mode & 0o777 == 0o777 & ~mask, d  # mkdtemp alone would give 0700
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f


def test_a_single_output_file_follows_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        path = write_output_file(tmp_path / "lint.json", '{"schema": "bughunt.lint"}', "bughunt.lint")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o640  # mkstemp alone would give 0600


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid`, from /proc."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_workers_and_leaves_nothing_behind(signum, code, tmp_path, checkpoint):
    """A real compare in a subprocess, signalled while its hf worker is loading (a second hf job waits for the same
    worker, and must not start a new one): exit 128+signal, a one-line message, no worker left running, no
    temporary folder in TMPDIR, nothing at --out or beside it."""
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    out = tmp_path / "reports" / "run"
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "bughunt.cli", "compare", str(checkpoint), "--impl", "hf", "--impl", "hf:bf16",
                             "--impl", "reference",
                             "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        workers: list[int] = []
        while time.monotonic() < deadline and not workers:
            workers = [p for p in _children(proc.pid) if "bughunt.worker" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
            time.sleep(0.05)
        assert workers, "the hf worker never started"
        assert any(p.name.startswith("bughunt-traces-") for p in scratch.iterdir())
        time.sleep(0.5)  # the worker is importing torch and transformers
        assert proc.poll() is None, "the run finished before it could be interrupted"
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr
    assert stderr.strip().splitlines() == [f"bughunt: interrupted by {signal.Signals(signum).name}: stopped the workers and "
                                           "removed temporary files; no half-written output remains."]
    time.sleep(0.2)
    assert not [p for p in workers if _running(p)], "a worker process outlived the run"
    assert list(scratch.iterdir()) == []  # no bughunt-traces-*, no worker logs
    assert not os.path.lexists(out) and not (tmp_path / "reports").exists()


def test_a_report_written_before_markers_existed_is_replaced_but_not_one_with_a_user_file(tmp_path, report, checkpoint, capsys):
    legacy = tmp_path / "legacy"
    shutil.copytree(report, legacy)
    (legacy / MARKER).unlink()
    (legacy / "loss.png").unlink()  # reports from before the markers had no loss plot
    assert main(["compare", str(checkpoint), *FAST, "--out", str(legacy)]) == 0
    assert read_marker(legacy)["kind"] == "compare"
    (legacy / MARKER).unlink()
    (legacy / "traces" / "my-analysis.py").write_text("print('mine')\n")
    assert_refused(capsys, ["compare", str(checkpoint), *FAST, "--out", str(legacy)], r"non-empty directory that bughunt did not write",
                   watch=[tmp_path])
