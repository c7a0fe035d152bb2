"""Hub ids as checkpoints: `org/name` or `org/name@revision`, as copied from a model page, resolved with
huggingface_hub to a snapshot directory of the hub cache holding config, safetensors and tokenizer files only.

huggingface_hub reads HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN itself; bughunt sets none of them. Two
of them (the cache folder, offline mode) huggingface_hub reads once, when it is first imported: this module reads
them again at call time, with huggingface_hub's own rules, so that what the environment says now is what is used.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
from pathlib import Path
from typing import Iterator

from bughunt.errors import BughuntError

# What a checkpoint needs and nothing else: never pickled weights (*.bin, *.pt, *.pth), never other formats.
ALLOW_PATTERNS = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)

# huggingface_hub's validate_repo_id, for one namespace and one name: 1 to 96 of [A-Za-z0-9_.-] each, starting and
# ending with a letter, digit or underscore; "--" and ".." nowhere; no ".git" at the end.
_PART = r"(?=[A-Za-z0-9_.\-]{1,96}(?:/|$))[A-Za-z0-9_](?:[A-Za-z0-9_.\-]*[A-Za-z0-9_])?"
# Never downloaded: files in subfolders (original/consolidated.00.pth, onnx/, gguf variants; transformers reads a
# checkpoint's top folder) and Mistral's consolidated.safetensors, the same weights again in Mistral's own names.
IGNORE_PATTERNS = ("*/*", "consolidated*.safetensors")

_REPO_ID = re.compile(rf"{_PART}/{_PART}")
# A branch, tag, `refs/pr/N` or commit sha: git ref characters, no "..", no leading or trailing "/".
_REVISION = re.compile(r"[A-Za-z0-9_.\-]+(?:/[A-Za-z0-9_.\-]+)*")
# A name ending like a file is a mistyped path (a .gguf that is not there), not a model repository.
_FILE_SUFFIXES = (".gguf", ".safetensors", ".json", ".toml", ".bin", ".pt", ".pth", ".npz")
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub.constants.ENV_VARS_TRUE_VALUES


def split_hub_id(text: str) -> tuple[str, str | None] | None:
    """(repo_id, revision or None) when `text` has the form of a hub id, else None. Says nothing of the disk."""
    repo_id, at, revision = text.partition("@")
    if not _REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id or repo_id.endswith(".git"):
        return None
    if repo_id.lower().endswith(_FILE_SUFFIXES):
        return None
    if at and (not _REVISION.fullmatch(revision) or ".." in revision):
        return None
    return repo_id, (revision if at else None)


def looks_like_hub_id(text: str) -> bool:
    """True for `org/name` or `org/name@rev` that is not a path: an absolute path, one starting with ./ ../ or ~,
    and anything that exists on disk (a local directory of the same name wins, as in transformers) are paths."""
    text = str(text)
    if os.path.isabs(text) or text.startswith(("./", "../", "~", ".\\", "..\\")):
        return False
    if os.path.lexists(text):
        return False
    return split_hub_id(text) is not None


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub uses, read from the environment now (HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE,
    HF_HOME, XDG_CACHE_HOME, in huggingface_hub.constants' order)."""
    env = os.environ
    home = env.get("HF_HOME", os.path.join(env.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")),
                                           "huggingface"))
    home = os.path.expandvars(os.path.expanduser(home))
    cache = env.get("HF_HUB_CACHE", env.get("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub")))
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it, read now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return value is not None and value.upper() in _TRUE


@contextlib.contextmanager
def _offline_mode(offline: bool) -> Iterator[None]:
    """huggingface_hub's offline flag set to the environment's value for one call, then put back: the module read
    HF_HUB_OFFLINE when it was imported, which may have been before the environment changed."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def resolve_hub_id(text: str) -> tuple[Path, dict]:
    """Resolve `org/name[@revision]` to its snapshot directory in the hub cache (downloading config, safetensors and
    tokenizer files unless HF_HUB_OFFLINE is set), and a record of what was resolved."""
    parts = split_hub_id(str(text))
    if parts is None:
        raise BughuntError(f"{text!r} is not a hub id: write org/name or org/name@revision (letters, digits, '-', '_' "
                           "and '.'), or give the path of a checkpoint directory.")
    repo_id, revision = parts
    requested = revision or "main"
    import huggingface_hub

    offline, cache = hub_offline(), hub_cache_dir()
    try:
        with _offline_mode(offline):
            folder = huggingface_hub.snapshot_download(repo_id, revision=requested, allow_patterns=list(ALLOW_PATTERNS),
                                                       ignore_patterns=list(IGNORE_PATTERNS), cache_dir=cache,
                                                       local_files_only=offline)
    except Exception as e:  # every failure of the hub or the network is the user's to fix: say how, no traceback
        raise _hub_error(e, repo_id, requested, offline, cache) from None
    path = Path(folder)
    files = _checkpoint_files(path, repo_id, requested)
    return path, {"hub_id": repo_id, "revision_requested": requested, "revision": path.name, "path": str(path),
                  "files": files, "huggingface_hub": huggingface_hub.__version__}


def _checkpoint_files(path: Path, repo_id: str, revision: str) -> list[str]:
    """The snapshot's files bughunt asked for; a snapshot without config.json or safetensors weights is refused."""
    files = sorted(p.name for p in path.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in ALLOW_PATTERNS)
                   and not any(fnmatch.fnmatch(p.name, pat) for pat in IGNORE_PATTERNS))
    missing = [what for what, ok in (("config.json", "config.json" in files),
                                     ("*.safetensors weights", any(f.endswith(".safetensors") for f in files))) if not ok]
    if missing:
        raise BughuntError(f"hub id {repo_id} at revision {revision} ({path}) has no {' and no '.join(missing)}: bughunt "
                           "reads Hugging Face-format checkpoints with safetensors weights only, never pickled weights "
                           f"(*.bin). It has: {', '.join(files) or 'none of the files bughunt reads'}. Use a repository or "
                           "revision with safetensors weights, or convert the weights and give the local directory.")
    return files


def _hub_error(e: Exception, repo_id: str, revision: str, offline: bool, cache: Path) -> BughuntError:
    """The BughuntError for a failed snapshot_download: the hub's own words and what to set or run."""
    from huggingface_hub import errors

    said = " ".join(str(e).split())[:700].rstrip(". ") + "."
    where = f"hub id {repo_id} (revision {revision})"
    download = f"`hf download {repo_id}{f' --revision {revision}' if revision != 'main' else ''}`"
    cache_note = f"HF_HOME / HF_HUB_CACHE say the cache is {cache}"
    if isinstance(e, errors.GatedRepoError):
        return BughuntError(f"{where} is gated: {said} Accept its terms on https://huggingface.co/{repo_id}, then set "
                            "HF_TOKEN to a token of that account (or run `hf auth login`).")
    if isinstance(e, errors.RepositoryNotFoundError):
        return BughuntError(f"{where} was not found on the hub: {said} Check the id; for a private repository set "
                            "HF_TOKEN to a token that can read it (or run `hf auth login`).")
    if isinstance(e, errors.RevisionNotFoundError):
        return BughuntError(f"{where}: the revision does not exist: {said} Give a branch, tag or commit sha the "
                            f"repository has (https://huggingface.co/{repo_id}/commits/main).")
    if isinstance(e, errors.LocalEntryNotFoundError) and offline:
        return BughuntError(f"{where} is not in the hub cache and HF_HUB_OFFLINE is set, so it cannot be downloaded "
                            f"({cache_note}). Download it first with {download} (with the same HF_HOME), or unset "
                            "HF_HUB_OFFLINE so that bughunt downloads it.")
    if isinstance(e, errors.LocalEntryNotFoundError):
        return BughuntError(f"{where} could not be fetched from the hub and is not complete in the hub cache: {said} "
                            f"Check the network (HF_ENDPOINT, HTTPS_PROXY) and HF_TOKEN, or download it first with "
                            f"{download}; {cache_note}; set HF_HUB_OFFLINE=1 to use the cache only.")
    if isinstance(e, errors.HFValidationError):
        return BughuntError(f"{where} is not a valid hub id or revision: {said}")
    return BughuntError(f"{where} could not be resolved ({type(e).__name__}: {said}). Check the network (HF_ENDPOINT, "
                        f"HTTPS_PROXY) and HF_TOKEN, or download it first with {download}; {cache_note}; set "
                        "HF_HUB_OFFLINE=1 to use the cache only.")
