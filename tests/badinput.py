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


def shard_checkpoint(ck: Path, parts: int = 3, index: bool = True) -> dict[str, str]:
    """Split ck/model.safetensors into `parts` shard files (tensors dealt round-robin by sorted name), writing
    model.safetensors.index.json when `index`; returns the weight_map (tensor name -> shard file name)."""
    from bughunt.safetensors_io import read_safetensors, write_safetensors

    tensors = read_safetensors(ck / "model.safetensors")
    names = sorted(tensors)
    (ck / "model.safetensors").unlink()
    weight_map = {}
    for i in range(parts):
        shard = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        write_safetensors(ck / shard, {n: tensors[n] for n in names[i::parts]})
        weight_map.update({n: shard for n in names[i::parts]})
    if index:
        write_index(ck, weight_map)
    return weight_map


def write_index(ck: Path, weight_map: dict) -> None:
    import json

    (ck / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
