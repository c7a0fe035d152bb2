"""Progress lines (bughunt.progress): drawn on a terminal outside CI, or when BUGHUNT_PROGRESS=1 forces them;
nothing otherwise, and then tqdm is not even imported. Several threads draw their own lines side by side."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bughunt import progress
from bughunt.cli import main
from bughunt.sweep import sweep

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def terminal():
    """A real terminal (the secondary side of a pseudo-terminal, 0 columns wide until someone sizes it) to draw on;
    `stream.screen()` reads what was drawn."""
    import select

    primary, secondary = os.openpty()
    stream = os.fdopen(secondary, "w")

    def screen() -> str:  # the kernel delivers pty output asynchronously: read until it has been quiet for a moment
        chunks = []
        while select.select([primary], [], [], 0.5)[0]:
            chunks.append(os.read(primary, 65536))
        return b"".join(chunks).decode()

    stream.screen = screen
    yield stream
    stream.close()
    os.close(primary)


def test_shown_on_a_terminal_outside_ci_only(monkeypatch, terminal):
    monkeypatch.delenv("BUGHUNT_PROGRESS", raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert progress.enabled(terminal)
    assert not progress.enabled(io.StringIO())
    monkeypatch.setenv("CI", "true")
    assert not progress.enabled(terminal)
    monkeypatch.delenv("CI")
    monkeypatch.setenv("BUGHUNT_PROGRESS", "0")
    assert not progress.enabled(terminal)
    monkeypatch.setenv("BUGHUNT_PROGRESS", "1")
    monkeypatch.setenv("CI", "true")
    assert progress.enabled(io.StringIO())


def test_a_terminal_shows_the_line_even_before_it_is_sized(monkeypatch, terminal):
    monkeypatch.delenv("BUGHUNT_PROGRESS", raising=False)
    monkeypatch.delenv("CI", raising=False)
    with progress.task("hf:bf16", total=4, unit="layer", stream=terminal) as t:
        t.update(stage="loading")
        terminal.flush()
        assert "hf:bf16 loading:   0%" in terminal.screen()
        t.advance(3)
        t.update(stage="forward", done=0)  # a new count from zero
        terminal.flush()
        assert "hf:bf16 forward:   0%" in terminal.screen()


def test_off_is_one_shared_do_nothing_task_and_never_imports_tqdm():
    code = ("import sys; from bughunt import progress; t = progress.task('x', total=3); t.update(stage='s'); t.advance(); "
            "t.close(); print(t is progress.OFF, 'tqdm' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in ("BUGHUNT_PROGRESS", "CI")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert proc.stdout.split() == ["True", "False"] and proc.stderr == "", proc.stderr


def test_forced_lines_appear_one_per_thread_with_stage_count_and_eta(monkeypatch):
    monkeypatch.setenv("BUGHUNT_PROGRESS", "1")
    stream = io.StringIO()
    start = threading.Barrier(2)

    def work(name: str) -> None:
        with progress.task(name, total=4, unit="layer", stream=stream) as t:
            start.wait()
            t.update(stage="forward")
            for _ in range(4):
                t.advance()
                t.update()  # redraw now, whatever tqdm's refresh interval

    threads = [threading.Thread(target=work, args=(name,)) for name in ("hf:fp32", "hf:bf16")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    text = stream.getvalue()
    for name in ("hf:fp32", "hf:bf16"):
        assert f"{name} forward:" in text and f"{name} forward: 100%" in text
    assert "3/4 [" in text and "<" in text and "layer/s" in text  # a count, elapsed<remaining, a rate
    assert "\x1b[A" in text  # the second line is drawn below the first, not over it


def test_printing_through_printer_takes_the_lines_down_and_redraws_them(monkeypatch, capsys):
    monkeypatch.setenv("BUGHUNT_PROGRESS", "1")
    with progress.task("bughunt ci", total=3, unit="cell") as t:  # draws on sys.stderr, captured
        t.advance()
        t.update()
        capsys.readouterr()
        assert progress.printer(print)("  llama-cpu: 2/2 cells pass") is None
        captured = capsys.readouterr()
    assert captured.out == "  llama-cpu: 2/2 cells pass\n"
    assert captured.err.startswith("\r") and "bughunt ci:  33%" in captured.err  # cleared, then drawn again


@pytest.mark.slow
def test_sweep_prints_no_progress_when_stderr_is_not_a_terminal(monkeypatch, capfd, tiny, tmp_path):
    monkeypatch.delenv("BUGHUNT_PROGRESS", raising=False)
    monkeypatch.delenv("CI", raising=False)
    code = main(["sweep", str(tiny["llama"]), "--impl", "hf", "--toggle", "rope_dtype=model", "--out", str(tmp_path / "sw")])
    out, err = capfd.readouterr()
    assert code == 0 and "rope_dtype=model" in out
    assert "sweep hf" not in err and "setting" not in err and "\r" not in err, err


def test_sweep_forced_progress_counts_its_settings(monkeypatch, capsys, tiny):
    monkeypatch.setenv("BUGHUNT_PROGRESS", "1")
    sweep(tiny["llama"], impl="hf", toggles=["rope_dtype=model", "bos=off"], render=False, isolate=False)
    err = capsys.readouterr().err
    assert "sweep hf running hf:" in err and "sweep hf noise floor:" in err
    assert "sweep hf setting:" in err and "/3 [" in err  # as is, then one setting per toggle
