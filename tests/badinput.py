"""The bad-input contract, checked the same way for every case of the corpus: the CLI exits 2, prints one
message (no traceback) naming the problem, and leaves every watched path (the checkpoint, --out, the user's
files) byte for byte and mode for mode as it was."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Iterable


def snapshot(paths: Iterable[Path]) -> dict[str, tuple]:
    """path -> (kind, sha256, mode) for each path and everything below it; absent paths recorded as absent."""
    state: dict[str, tuple] = {}
    for root in paths:
        root = Path(root)
        if not os.path.lexists(root):
            state[str(root)] = ("absent",)
            continue
        todo = [root]
        while todo:
            p = todo.pop()
            if p.is_symlink():
                state[str(p)] = ("link", os.readlink(p))
            elif p.is_dir():
                state[str(p)] = ("dir", None, p.stat().st_mode)
                todo.extend(sorted(p.iterdir()))
            else:
                state[str(p)] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
    return state


def assert_refused(capsys, argv: list[str], message: str, watch: Iterable[Path] = ()) -> str:
    """Run `bughunt argv` in this process and assert the bad-input contract; `message` is a regular expression
    the error must match. Returns the message."""
    from bughunt.cli import main

    watch = list(watch)
    before = snapshot(watch)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse refuses bad flags with SystemExit(2)
        code = e.code
    captured = capsys.readouterr()
    err = captured.err
    assert code == 2, f"exit {code} for {argv}; stderr: {err[-2000:]}\nstdout: {captured.out[-1000:]}"
    assert "Traceback" not in err and "Traceback" not in captured.out, err
    assert re.search(message, err, re.IGNORECASE | re.DOTALL), f"message {message!r} not in: {err}"
    assert snapshot(watch) == before, f"{argv} changed a watched path"
    return err
