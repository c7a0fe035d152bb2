"""Hub ids as checkpoints (bughunt/hub.py): `org/name[@revision]` resolves through huggingface_hub's real
snapshot_download to a snapshot directory of a hub cache laid out exactly as huggingface_hub lays it out
(`$HF_HOME/hub/models--org--name/{blobs,refs,snapshots}`), built here from the tiny llama checkpoint. No test reaches
the network: offline tests set HF_HUB_OFFLINE=1; online ones point HF_ENDPOINT at a closed port or at a local HTTP
server answering as the hub answers a missing or gated repository."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bughunt.errors import BughuntError
from bughunt.hub import ALLOW_PATTERNS, IGNORE_PATTERNS, hub_cache_dir, hub_offline, looks_like_hub_id, resolve_hub_id, split_hub_id

SHA_OLD = "1" * 40
SHA_NEW = "2" * 40
REPO = Path(__file__).resolve().parents[1]
HUB_VARS = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
            "HF_ENDPOINT", "HF_TOKEN")


def _blob_name(path: Path, lfs: bool) -> str:
    """The etag huggingface_hub names a blob by: sha256 for LFS files (weights), the git blob sha1 otherwise."""
    digest = hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def add_snapshot(cache: Path, repo_id: str, sha: str, source: Path, refs: tuple[str, ...] = ("main",),
                 extra: dict[str, bytes] | None = None, link: bool = False) -> Path:
    """Put `source`'s files (and `extra` name -> bytes) into the cache as commit `sha` of `repo_id`: each file a blob
    under blobs/ (a copy, or with link=True a symlink to the file, for a real model's weights), linked from
    snapshots/<sha>/ by a relative symlink, each ref a file under refs/ holding the sha."""
    assert not (link and extra), "extra files are copied, never linked"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    files = {p.name: p for p in sorted(source.iterdir()) if p.is_file()}
    for name, data in (extra or {}).items():
        files[name] = repo / f"extra-{name}"
        files[name].write_bytes(data)
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for name, path in files.items():
        blob = repo / "blobs" / _blob_name(path, lfs=name.endswith((".safetensors", ".bin")))
        if link:
            blob.symlink_to(path.resolve())
        elif not blob.exists():
            shutil.copyfile(path, blob)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob.name))
    for path in repo.glob("extra-*"):
        path.unlink()
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(sha)  # huggingface_hub writes the sha without a newline
    return snapshot


@pytest.fixture
def hub(tmp_path, tiny, monkeypatch):
    """An offline hub cache under $HF_HOME holding tiny/llama at two commits: v1 (tag) and main."""
    for var in HUB_VARS:
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    add_snapshot(home / "hub", "tiny-org/tiny-llama", SHA_OLD, tiny["llama"], refs=("v1",))
    add_snapshot(home / "hub", "tiny-org/tiny-llama", SHA_NEW, tiny["llama"], refs=("main", "refs/pr/3"),
                 extra={"pytorch_model.bin": b"not for bughunt", "README.md": b"# tiny"})
    return home


def _run_python(code: str, env_changes: dict[str, str | None], cwd: Path) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (huggingface_hub reads HF_ENDPOINT and friends when imported) with the
    environment changed as given (None removes a variable)."""
    env = {k: v for k, v in os.environ.items() if k not in HUB_VARS}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


RESOLVE = """
import json, sys
from bughunt.errors import BughuntError
from bughunt.hub import resolve_hub_id
try:
    path, info = resolve_hub_id(sys.argv[1] if len(sys.argv) > 1 else {text!r})
except BughuntError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
print(json.dumps(info))
"""


# --- what counts as a hub id ---

@pytest.mark.parametrize("text, parts", [
    ("google/gemma-2-2b", ("google/gemma-2-2b", None)),
    ("Qwen/Qwen2.5-0.5B@main", ("Qwen/Qwen2.5-0.5B", "main")),
    ("org/name@v1.0", ("org/name", "v1.0")),
    ("org/name@refs/pr/12", ("org/name", "refs/pr/12")),
    (f"org/name@{SHA_NEW}", ("org/name", SHA_NEW)),
    ("org_1/na_me.x-y", ("org_1/na_me.x-y", None)),
    ("a" * 96 + "/b", ("a" * 96 + "/b", None)),
])
def test_hub_id_forms_are_recognised(text, parts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert split_hub_id(text) == parts
    assert looks_like_hub_id(text)


@pytest.mark.parametrize("text", [
    "gpt2",  # no namespace: a mistyped local directory, not a hub id
    "a/b/c", "org/", "/name", "org/na me", "org/na--me", "org/na..me", "org/.name", "org/name-", "org/name.git",
    "org/café", "a" * 97 + "/b", "org/name@", "org/name@a..b", "org/name@/main", "org/name@a b",
    "models/smol.gguf", "runs/config.json",  # mistyped files, not repositories
    "/abs/org/name", "./org/name", "../org/name", "~/org/name", "~org/name",
])
def test_non_hub_ids_are_refused(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_like_hub_id(text)


@pytest.mark.parametrize("repo_id", ["org/name", "a/b", "org/na--me", "org/na..me", "org/.name", "org/name-", "org/name.git",
                                     "org/café", "a" * 96 + "/b", "a" * 97 + "/b", "o-/n", "_o/n_", "org/na me", "a/b/c"])
def test_repo_id_rules_are_huggingface_hubs(repo_id):
    """split_hub_id accepts a namespaced repo id exactly when huggingface_hub's own validator does."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
        valid = True
    except HFValidationError:
        valid = False
    assert (split_hub_id(repo_id) is not None) == valid


def test_a_local_directory_of_the_same_name_wins(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_like_hub_id("tiny-org/tiny-llama")
    (tmp_path / "tiny-org" / "tiny-llama").mkdir(parents=True)
    assert not looks_like_hub_id("tiny-org/tiny-llama")
    assert looks_like_hub_id("tiny-org/other")


# --- resolution through the hub cache, offline ---

def test_main_resolves_to_the_snapshot_and_its_sha(hub):
    path, info = resolve_hub_id("tiny-org/tiny-llama")
    snapshot = hub / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / SHA_NEW
    assert path == snapshot
    assert info["hub_id"] == "tiny-org/tiny-llama" and info["revision_requested"] == "main"
    assert info["revision"] == SHA_NEW and info["path"] == str(snapshot)
    import huggingface_hub

    assert info["huggingface_hub"] == huggingface_hub.__version__
    assert "config.json" in info["files"] and any(f.endswith(".safetensors") for f in info["files"])
    assert "pytorch_model.bin" not in info["files"] and "README.md" not in info["files"]  # never pickles, only what was asked
    from bughunt.spec import load_spec

    assert load_spec(path).family == "llama"  # the snapshot reads as a checkpoint directory, through its symlinks


@pytest.mark.parametrize("revision, sha", [(SHA_OLD, SHA_OLD), (SHA_NEW, SHA_NEW), ("v1", SHA_OLD), ("main", SHA_NEW),
                                           ("refs/pr/3", SHA_NEW)])
def test_revision_by_sha_and_by_ref_name(hub, revision, sha):
    path, info = resolve_hub_id(f"tiny-org/tiny-llama@{revision}")
    assert path.name == sha and info["revision"] == sha and info["revision_requested"] == revision


def test_hf_home_is_read_when_resolving(hub, tmp_path, monkeypatch):
    """HF_HOME changed after huggingface_hub was imported still decides which cache is read; HF_HUB_CACHE wins."""
    other = tmp_path / "other-home"
    monkeypatch.setenv("HF_HOME", str(other))
    with pytest.raises(BughuntError, match="not in the hub cache"):
        resolve_hub_id("tiny-org/tiny-llama")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub / "hub"))
    assert resolve_hub_id("tiny-org/tiny-llama")[1]["revision"] == SHA_NEW


def test_offline_and_not_cached_names_the_id_revision_and_variables(hub):
    with pytest.raises(BughuntError) as e:
        resolve_hub_id("tiny-org/missing@v2")
    message = str(e.value)
    for needle in ("tiny-org/missing", "v2", "HF_HUB_OFFLINE", "HF_HOME", str(hub / "hub"),
                   "hf download tiny-org/missing --revision v2"):
        assert needle in message, (needle, message)
    with pytest.raises(BughuntError, match=r"tiny-org/tiny-llama \(revision v9\).*HF_HUB_OFFLINE"):
        resolve_hub_id("tiny-org/tiny-llama@v9")  # the repository is cached, that revision is not


def test_a_snapshot_without_safetensors_is_refused(hub, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (pickled / "pytorch_model.bin").write_bytes(b"pickle")
    add_snapshot(hub / "hub", "tiny-org/pickled", "3" * 40, pickled)
    with pytest.raises(BughuntError, match=r"no \*\.safetensors weights.*never pickled"):
        resolve_hub_id("tiny-org/pickled")


def test_not_a_hub_id_is_refused(hub):
    with pytest.raises(BughuntError, match="is not a hub id"):
        resolve_hub_id("org/na--me")


# --- the environment, as huggingface_hub reads it ---

@pytest.mark.parametrize("env", [
    {},
    {"HF_HOME": "/tmp/h1"},
    {"XDG_CACHE_HOME": "/tmp/xdg"},
    {"HF_HOME": "~/h2", "HUGGINGFACE_HUB_CACHE": "/tmp/legacy"},
    {"HF_HOME": "/tmp/h3", "HUGGINGFACE_HUB_CACHE": "/tmp/legacy", "HF_HUB_CACHE": "/tmp/new"},
    {"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "true"}, {"HF_HUB_OFFLINE": "0"}, {"TRANSFORMERS_OFFLINE": "yes"},
])
def test_cache_and_offline_are_read_as_huggingface_hub_reads_them(env, tmp_path):
    out = _run_python("from huggingface_hub import constants\nfrom bughunt.hub import hub_cache_dir, hub_offline\n"
                      "print(constants.HF_HUB_CACHE == str(hub_cache_dir()), constants.HF_HUB_OFFLINE == hub_offline())",
                      env, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


def test_bughunt_leaves_the_hub_variables_alone(monkeypatch):
    for var in HUB_VARS:
        monkeypatch.delenv(var, raising=False)
    assert not hub_offline()
    assert hub_cache_dir() == Path(os.path.expanduser("~/.cache/huggingface/hub"))


# File listings of real repositories (as on their hub pages), and what bughunt downloads of each.
LISTINGS = {
    "mistral-style": (
        ["config.json", "generation_config.json", "consolidated.safetensors", "model-00001-of-00003.safetensors",
         "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors", "model.safetensors.index.json",
         "params.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer.model.v3",
         "tokenizer_config.json", "README.md", ".gitattributes"],
        ["config.json", "generation_config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
         "model-00003-of-00003.safetensors", "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json",
         "tokenizer.model", "tokenizer_config.json"]),
    "llama-3-style": (
        ["config.json", "generation_config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
         "model.safetensors.index.json", "original/consolidated.00.pth", "original/params.json",
         "original/tokenizer.model", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "LICENSE"],
        ["config.json", "generation_config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
         "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]),
    "gpt2-style": (
        ["config.json", "generation_config.json", "merges.txt", "model.safetensors", "pytorch_model.bin", "tf_model.h5",
         "flax_model.msgpack", "rust_model.ot", "onnx/decoder_model.onnx", "64-8bits.tflite", "tokenizer.json",
         "vocab.json", "onnx/model.safetensors"],
        ["config.json", "generation_config.json", "merges.txt", "model.safetensors", "tokenizer.json", "vocab.json"]),
    "smollm2-style": (
        ["config.json", "generation_config.json", "model.safetensors", "chat_template.jinja", "merges.txt",
         "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "onnx/model.onnx",
         "runs/events.out.tfevents"],
        ["chat_template.jinja", "config.json", "generation_config.json", "merges.txt", "model.safetensors",
         "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"]),
}


@pytest.mark.parametrize("listing", LISTINGS)
def test_what_is_downloaded_of_real_repositories(listing):
    """The patterns through huggingface_hub's own filter (the one snapshot_download applies): the top folder's config,
    safetensors, index and tokenizer files; never pickles, other formats, subfolders or Mistral's consolidated copy."""
    from huggingface_hub.utils import filter_repo_objects

    files, expected = LISTINGS[listing]
    chosen = filter_repo_objects(files, allow_patterns=list(ALLOW_PATTERNS), ignore_patterns=list(IGNORE_PATTERNS))
    assert sorted(chosen) == sorted(expected)


def test_the_record_lists_the_top_folders_checkpoint_files_only(hub, tiny):
    """A snapshot that holds more (a consolidated copy, a subfolder, from an earlier full download) is listed as
    what bughunt reads."""
    snapshot = add_snapshot(hub / "hub", "tiny-org/full", "5" * 40, tiny["llama"],
                            extra={"consolidated.safetensors": b"x", "README.md": b"# full"})
    (snapshot / "original").mkdir()
    (snapshot / "original" / "model.safetensors").symlink_to(snapshot / "model.safetensors")
    files = resolve_hub_id("tiny-org/full")[1]["files"]
    assert files == ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                     "tokenizer.json", "tokenizer_config.json"]  # not consolidated.safetensors, original/, README.md, bughunt_tiny.json


def test_allow_patterns_never_match_pickles():
    import fnmatch

    for name in ("pytorch_model.bin", "model.pt", "weights.pth", "model.ckpt", "flax_model.msgpack", "tf_model.h5"):
        assert not any(fnmatch.fnmatch(name, pattern) for pattern in ALLOW_PATTERNS), name


# --- online failures: the hub's own words, never a traceback ---

class _HubAnswers(http.server.BaseHTTPRequestHandler):
    """Answers every request as the hub answers a missing repository (404 RepoNotFound) or a gated one (403
    GatedRepo), by the repository name in the URL."""

    def _answer(self):
        gated = "gated" in self.path
        self.send_response(403 if gated else 404)
        self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
        self.send_header("X-Error-Message", "Access to model tiny-org/gated is restricted and you are not in the "
                         "authorized list." if gated else "Repository not found")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(b"{}")

    do_GET = do_HEAD = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubAnswers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("repo_id, expected", [
    ("tiny-org/missing", r"hub id tiny-org/missing \(revision main\) was not found on the hub: 404 .*Repository Not Found.*\. Check the id.*HF_TOKEN"),
    ("tiny-org/gated", r"hub id tiny-org/gated \(revision main\) is gated: .*not in the authorized list.*HF_TOKEN"),
])
def test_missing_and_gated_repositories_carry_the_hubs_message(fake_hub, tmp_path, repo_id, expected):
    import re

    out = _run_python(RESOLVE.format(text=repo_id), {"HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "0",
                                                     "HF_ENDPOINT": fake_hub}, tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    assert re.search(expected, out.stderr, re.DOTALL), out.stderr


def _hub_serving(repo_id: str, sha: str, files: dict[str, bytes], requests: list[tuple[str, str]]):
    """A request handler answering the hub's API for one repository at one commit, as huggingface_hub's
    snapshot_download asks it: repo info, the recursive tree listing, and each file under /resolve/ (X-Repo-Commit and
    ETag headers: sha256 for LFS files, git blob sha1 otherwise). Every request is appended to `requests`."""
    def entry(path: str, data: bytes) -> dict:
        e = {"type": "file", "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(), "size": len(data), "path": path}
        if path.endswith((".safetensors", ".bin", ".pth")):
            e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return e

    class Hub(http.server.BaseHTTPRequestHandler):
        def _send(self, code: int, body: bytes, headers: dict[str, str]):
            self.send_response(code)
            for k, v in (headers | {"Content-Length": str(len(body))}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _answer(self):
            from urllib.parse import unquote, urlparse

            path = unquote(urlparse(self.path).path)
            requests.append((self.command, path))
            if path in (f"/api/models/{repo_id}/revision/main", f"/api/models/{repo_id}/revision/{sha}"):
                info = {"id": repo_id, "sha": sha, "siblings": [{"rfilename": p} for p in files]}
                return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
            if path == f"/api/models/{repo_id}/tree/{sha}":
                tree = [entry(p, d) for p, d in files.items()]
                return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
            name = path.removeprefix(f"/{repo_id}/resolve/{sha}/")
            if name in files:
                e = entry(name, files[name])
                etag = e["lfs"]["oid"] if "lfs" in e else e["oid"]
                return self._send(200, files[name], {"X-Repo-Commit": sha, "ETag": f'"{etag}"'})
            return self._send(404, b"{}", {"X-Error-Code": "RepoNotFound" if "/api/models/" in path else "EntryNotFound"})

        do_GET = do_HEAD = _answer

        def log_message(self, *args):
            pass

    return Hub


@pytest.fixture
def local_hub(tiny):
    """A hub at a local address serving tiny/llama as tiny-org/tiny-llama at commit 6...6, with what real repositories
    also hold: pickled weights, a subfolder, a consolidated copy, a README. Yields (endpoint, requests)."""
    files = {p.name: p.read_bytes() for p in tiny["llama"].iterdir() if p.name != "bughunt_tiny.json"}
    files |= {"pytorch_model.bin": b"PICKLE", "original/consolidated.00.pth": b"PICKLE",
              "consolidated.safetensors": b"0" * 64, "README.md": b"# tiny"}
    requests: list[tuple[str, str]] = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _hub_serving("tiny-org/tiny-llama", "6" * 40, files, requests))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    server.server_close()


def test_cli_downloads_a_hub_id_then_reads_it_offline(local_hub, tmp_path):
    """HF_HUB_OFFLINE unset: `bughunt lint org/name` downloads the checkpoint's files (and nothing else) into HF_HOME's
    cache; with HF_HUB_OFFLINE=1 afterwards the same id resolves from the cache to the same commit."""
    endpoint, requests = local_hub
    home = tmp_path / "home"
    out = _bughunt(["lint", "tiny-org/tiny-llama"], {"HF_HOME": str(home), "HF_ENDPOINT": endpoint}, tmp_path)
    assert out.returncode == 0, out.stderr
    snapshot = home / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / ("6" * 40)
    assert str(snapshot) in out.stdout
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                           "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    fetched = {path.rsplit("/", 1)[-1] for method, path in requests if "/resolve/" in path}
    assert not fetched & {"pytorch_model.bin", "consolidated.00.pth", "consolidated.safetensors", "README.md"}, fetched
    offline = _run_python(RESOLVE.format(text="tiny-org/tiny-llama"), {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1",
                                                                        "HF_ENDPOINT": "http://127.0.0.1:9"}, tmp_path)
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout)["revision"] == "6" * 40


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_network_down_names_the_variables(tmp_path):
    out = _run_python(RESOLVE.format(text="tiny-org/tiny-llama"), {
        "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}, tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    for needle in ("tiny-org/tiny-llama", "HF_HUB_OFFLINE", "HF_TOKEN", "hf download tiny-org/tiny-llama"):
        assert needle in out.stderr, (needle, out.stderr)


def test_network_down_but_cached_resolves_from_the_cache(tiny, tmp_path):
    """As huggingface_hub does: a hub that cannot be reached falls back to a cached snapshot of the revision."""
    add_snapshot(tmp_path / "home" / "hub", "tiny-org/tiny-llama", SHA_NEW, tiny["llama"])
    out = _run_python(RESOLVE.format(text="tiny-org/tiny-llama"), {
        "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}, tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["revision"] == SHA_NEW



def test_the_cli_and_the_tokenizer_leave_hf_hub_offline_unset(tiny, monkeypatch):
    """A user who has not set HF_HUB_OFFLINE gets huggingface_hub's default (online): bughunt does not set it, not at
    start-up and not when it loads a checkpoint's tokenizer, so a hub id named later still downloads."""
    from bughunt.cli import quiet_libraries
    from bughunt.text import load_tokenizer

    for var in HUB_VARS:
        monkeypatch.delenv(var, raising=False)
    quiet_libraries()
    load_tokenizer(tiny["llama"], "the text")
    assert [var for var in HUB_VARS if var in os.environ] == []


# --- through the CLI (bughunt/sources.py resolves every checkpoint argument), each in a fresh interpreter ---

def _bughunt(args: list[str], env_changes: dict[str, str | None], cwd: Path) -> subprocess.CompletedProcess:
    return _run_python(f"import sys\nfrom bughunt.cli import main\nsys.exit(main({args!r}))", env_changes, cwd)


def test_cli_lint_a_cached_hub_id(hub, tmp_path):
    out = _bughunt(["lint", "tiny-org/tiny-llama@v1"], {"HF_HOME": str(hub), "HF_HUB_OFFLINE": "1"}, tmp_path)
    assert out.returncode == 0, out.stderr
    assert str(hub / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / SHA_OLD) in out.stdout


def test_cli_a_missing_hub_id_exits_2_with_its_message(hub, tmp_path):
    out = _bughunt(["lint", "org/missing"], {"HF_HOME": str(hub), "HF_HUB_OFFLINE": "1"}, tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr + out.stdout
    assert out.stderr.startswith("bughunt: error: hub id org/missing (revision main) is not in the hub cache"), out.stderr
    for needle in ("HF_HUB_OFFLINE", "HF_HOME", "`hf download org/missing`"):
        assert needle in out.stderr, (needle, out.stderr)


def test_cli_goes_online_unless_hf_hub_offline_is_set(fake_hub, tmp_path):
    """HF_HUB_OFFLINE unset: the CLI asks the hub (here a local server that knows no repository) and says what it said."""
    out = _bughunt(["lint", "tiny-org/missing"], {"HF_HOME": str(tmp_path / "home"), "HF_ENDPOINT": fake_hub}, tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    assert "was not found on the hub: 404" in out.stderr, out.stderr


def test_cli_a_local_directory_named_like_the_id_wins(hub, tiny, tmp_path):
    """A directory org/name in the working directory is read, not the hub cache's snapshot of org/name."""
    local = tmp_path / "work" / "tiny-org" / "tiny-llama"
    local.parent.mkdir(parents=True)
    local.symlink_to(tiny["llama"], target_is_directory=True)
    out = _bughunt(["lint", "tiny-org/tiny-llama"], {"HF_HOME": str(hub), "HF_HUB_OFFLINE": "1"}, tmp_path / "work")
    assert out.returncode == 0, out.stderr
    assert "snapshots" not in out.stdout and " tiny-org/tiny-llama " in out.stdout, out.stdout


def test_cli_compare_records_the_resolved_commit(hub, tmp_path):
    """result.json says which hub id and commit were compared, and its command line pins the commit."""
    out_dir = tmp_path / "out"
    out = _bughunt(["compare", "tiny-org/tiny-llama", "--impl", "reference:fp32", "--impl", "reference", "--in-process",
                    "--tokens", "2,17,99,5", "--out", str(out_dir)], {"HF_HOME": str(hub), "HF_HUB_OFFLINE": "1"}, tmp_path)
    assert out.returncode == 0, out.stderr
    result = json.loads((out_dir / "result.json").read_text())
    assert result["checkpoint"]["source"]["hub_id"] == "tiny-org/tiny-llama"
    assert result["checkpoint"]["source"]["revision"] == SHA_NEW
    assert f"tiny-org/tiny-llama@{SHA_NEW}" in result["command"]


# --- the real model (SmolLM2-135M-Instruct, the checkpoint view of the GGUF bughunt ships) under its hub id ---

def test_the_real_model_under_its_hub_id(smollm2, tmp_path):
    """The smollm2 view placed in a hub cache as HuggingFaceTB/SmolLM2-135M-Instruct (blobs linked, not copied) resolves
    offline to its snapshot with exactly the files bughunt reads and reads as the 30-layer llama (the CLI path is the tiny
    model's: linting the real model takes a minute whatever its source)."""
    home = tmp_path / "home"
    sha = "4" * 40
    snapshot = add_snapshot(home / "hub", "HuggingFaceTB/SmolLM2-135M-Instruct", sha, smollm2, link=True)
    out = _run_python(RESOLVE.format(text="HuggingFaceTB/SmolLM2-135M-Instruct"), {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"},
                      tmp_path)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["path"] == str(snapshot) and info["revision"] == sha
    assert info["files"] == sorted(p.name for p in smollm2.iterdir() if p.name != "view.json")  # the GGUF view's record is no checkpoint file
    from bughunt.spec import load_spec

    spec = load_spec(snapshot)
    assert (spec.family, spec.num_layers, spec.hidden_size, spec.vocab_size) == ("llama", 30, 576, 49152)
    from bughunt.checkpoint import stored_shapes

    assert stored_shapes(snapshot)["model.embed_tokens.weight"][0] == (49152, 576)  # the weights, read through two symlinks
