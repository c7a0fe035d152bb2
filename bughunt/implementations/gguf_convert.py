"""Checkpoint -> GGUF with llama.cpp's own converter (`convert_hf_to_gguf.py`, its `conversion/` package and gguf-py,
vendored in the llama-cpp-python source archive; the installed wheel does not carry them). Conversions are cached in
the user cache directory by the checkpoint's content hash, the converter's version, the output type and the
vocabulary path; nothing is ever written inside the user's checkpoint.

Two vocabulary paths: `real` (the converter's own tokenizer export, as for any released model) and `none`
(`tokenizer.ggml.model = "none"` plus the vocabulary size: llama.cpp then runs on token ids alone). `auto` tries the
real path and falls back to `none` when the converter refuses the tokenizer (it refuses pre-tokenizers it does not
recognise, which includes the tiny checkpoints' BPE tokenizers); which path was taken, and why, is recorded.

`python -m bughunt.implementations.gguf_convert extract SDIST` unpacks the converter from a source archive (the
Makefile's `llamacpp` target does this)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bughunt.errors import BughuntError

LLAMA_CPP_PYTHON = "0.3.36"  # the pinned llama-cpp-python whose vendored converter is used
OUTTYPES = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}  # bughunt dtype -> the converter's --outtype (always passed)
VOCAB_PATHS = ("auto", "real", "none")
VOCAB_ONLY = "vocab"  # as a dtype: the converter's --vocab-only output (the tokenizer alone, for llama.cpp's tokenizer path)
_KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
_SKIP_FILES = (".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")  # not read by the converter for safetensors


def _cache_root() -> Path:
    from bughunt.tiny import cache_dir

    return cache_dir() / "llama.cpp"


def converter_dir() -> Path:
    """Where the extracted converter lives: $BUGHUNT_LLAMACPP_CONVERTER, else beside the installed llama_cpp, in
    this environment's share/ (so a converter always belongs to the environment whose wheel runs its output)."""
    env = os.environ.get("BUGHUNT_LLAMACPP_CONVERTER")
    return Path(env) if env else Path(sys.prefix) / "share" / "bughunt" / f"llama.cpp-converter-{LLAMA_CPP_PYTHON}"


def converter_info() -> dict:
    """The converter's provenance (llama-cpp-python version, vendored llama.cpp commit); refuses a missing converter."""
    d = converter_dir()
    info = d / "SOURCE.json"
    if not (d / "convert_hf_to_gguf.py").is_file() or not info.is_file():
        raise BughuntError(
            f"llama.cpp's converter is not extracted at {d}. Run `make llamacpp` (it downloads the llama-cpp-python "
            f"{LLAMA_CPP_PYTHON} source archive and extracts convert_hf_to_gguf.py and gguf-py), or `python -m "
            "bughunt.implementations.gguf_convert extract llama_cpp_python-" + LLAMA_CPP_PYTHON + ".tar.gz`.")
    return json.loads(info.read_text())


def extract_converter(sdist: Path, dest: Path | None = None, cmake_args: str | None = None) -> Path:
    """Unpack convert_hf_to_gguf.py, conversion/ and gguf-py/ from a llama-cpp-python source archive into `dest`
    (the converter directory by default), with SOURCE.json naming the archive, the vendored llama.cpp commit and
    the CMAKE_ARGS the wheel was built with (the Makefile passes them; they are not recorded anywhere else)."""
    sdist, dest = Path(sdist), Path(dest) if dest else converter_dir()
    if not sdist.is_file():
        raise BughuntError(f"{sdist} does not exist. Download it with `pip download --no-binary :all: --no-deps "
                           f"llama-cpp-python=={LLAMA_CPP_PYTHON}`.")
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        with tarfile.open(sdist) as tar:
            root = tar.getnames()[0].split("/")[0]
            vendored = f"{root}/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(vendored)
                       and m.name[len(vendored):].startswith(_KEEP) and (m.isfile() or m.isdir())]
            if not any(m.name.endswith("convert_hf_to_gguf.py") for m in members):
                raise BughuntError(f"{sdist} holds no vendor/llama.cpp/convert_hf_to_gguf.py; is it the llama-cpp-python source archive?")
            for m in members:
                m.name = m.name[len(vendored):]
            tar.extractall(tmp, members=members, filter="data")
            changelog = tar.extractfile(f"{root}/CHANGELOG.md")
            version = root.rpartition("-")[2]
            commit = _commit_from_changelog(changelog.read().decode() if changelog else "", version)
        (tmp / "SOURCE.json").write_text(json.dumps({"llama_cpp_python": version, "llama_cpp_commit": commit,
                                                     "sdist": sdist.name, "sdist_sha256": digest,
                                                     "wheel_cmake_args": cmake_args}, indent=1))
        if dest.exists():
            import shutil

            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _commit_from_changelog(text: str, version: str) -> str:
    """The llama.cpp commit a llama-cpp-python release vendors, as its CHANGELOG states it ("update llama.cpp to
    ggml-org/llama.cpp@<commit>" under the release's heading); "unknown" when it does not say."""
    section = text.partition(f"## [{version}]")[2].partition("\n## [")[0]
    m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section)
    return m.group(1) if m else "unknown"


# -- content hash -----------------------------------------------------------------------------------
def checkpoint_hash(checkpoint: Path) -> str:
    """sha256 over the names and bytes of the files the converter reads. Remembered per (path, size, mtime), so a
    checkpoint is read in full once, not at every run."""
    files = sorted(p for p in Path(checkpoint).iterdir() if p.is_file() and not p.name.endswith(_SKIP_FILES))
    stamp = json.dumps([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    memo = _cache_root() / "hashes" / (hashlib.sha256((str(Path(checkpoint).resolve()) + stamp).encode()).hexdigest() + ".txt")
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(h.hexdigest())
    return h.hexdigest()


# -- conversion -------------------------------------------------------------------------------------
def convert(checkpoint: Path, dtype: str, vocab: str = "auto", timeout: float = 3600.0) -> tuple[Path, dict]:
    """The cached GGUF of `checkpoint` at `dtype` (fp32/fp16/bf16), converting on first use. Returns its path and a
    record of the conversion (converter provenance, --outtype, vocabulary path and why, content hash)."""
    return convert_many([(checkpoint, dtype)], vocab, timeout)[0]


def convert_many(jobs: list[tuple[Path, str]], vocab: str = "auto", timeout: float = 3600.0) -> list[tuple[Path, dict]]:
    """`convert` for several (checkpoint, dtype) pairs, the missing ones in one converter process (one import of
    torch and the converter for all of them). A conversion that fails raises BughuntError with the converter's reason."""
    for _, dtype in jobs:
        if dtype not in OUTTYPES and dtype != VOCAB_ONLY:
            raise BughuntError(f"the llama.cpp converter writes {', '.join(OUTTYPES)}; {dtype} is made by quantizing a converted file.")
    if vocab not in VOCAB_PATHS:
        raise BughuntError(f"vocabulary path {vocab!r}: use one of {', '.join(VOCAB_PATHS)}.")
    source = converter_info()
    root = _cache_root() / "gguf"
    root.mkdir(parents=True, exist_ok=True)
    planned = []
    for checkpoint, dtype in jobs:
        digest = checkpoint_hash(checkpoint)
        key = f"{digest[:24]}-llamacpp{source['llama_cpp_python']}-{OUTTYPES.get(dtype, dtype)}-{vocab}"
        planned.append((Path(checkpoint), dtype, digest, root / f"{key}.gguf"))
    todo = [p for p in dict.fromkeys(planned) if not (p[3].is_file() and p[3].with_suffix(".json").is_file())]
    if todo:
        _run_converter(todo, vocab, source, timeout)
    return [(out, json.loads(out.with_suffix(".json").read_text())) for _, _, _, out in planned]


def _run_converter(todo: list, vocab: str, source: dict, timeout: float) -> None:
    tmps = []
    for _, _, _, out in todo:
        fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".gguf.tmp", dir=out.parent)
        os.close(fd)
        tmps.append(tmp)
    payload = [{"checkpoint": str(c.resolve()), "outfile": t, "outtype": OUTTYPES.get(d, "f32"), "vocab": vocab,
                "vocab_only": d == VOCAB_ONLY} for (c, d, _, _), t in zip(todo, tmps)]
    driver = Path(__file__).with_name("_gguf_driver.py")
    try:
        try:
            proc = subprocess.run([sys.executable, str(driver), str(converter_dir())], input=json.dumps(payload),
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BughuntError(f"llama.cpp's converter did not finish within {timeout:.0f} s.") from None
        answers = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        for i, (checkpoint, dtype, digest, out) in enumerate(todo):
            answer = answers[i] if i < len(answers) else {"ok": False, "error": _last_error(proc.stderr)}
            flags = "--vocab-only" if dtype == VOCAB_ONLY else f"--outtype {OUTTYPES[dtype]}"
            if not answer.pop("ok"):
                raise BughuntError(f"llama.cpp's converter (convert_hf_to_gguf.py {flags}) failed on {checkpoint}: {answer['error']}")
            answer.update(converter=source, outtype=OUTTYPES.get(dtype, dtype), checkpoint_sha256=digest,
                          command=f"convert_hf_to_gguf.py {checkpoint} {flags} --outfile <cache>")
            os.replace(tmps[i], out)
            out.with_suffix(".json").write_text(json.dumps(answer, indent=1))
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _last_error(stderr: str) -> str:
    """The converter's own reason, from the last lines of its log (a traceback's final line or a logged error)."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    return next((ln for ln in reversed(lines) if re.match(r"^(\w+(Error|Exception)|ERROR)", ln)), lines[-1] if lines else "no output")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bughunt.implementations.gguf_convert")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract", help="unpack the converter from a llama-cpp-python source archive")
    ex.add_argument("sdist", type=Path)
    ex.add_argument("--dest", type=Path, default=None)
    ex.add_argument("--cmake-args", default=None, help="the CMAKE_ARGS the llama-cpp-python wheel was built with")
    sub.add_parser("where", help="print where the converter is looked for")
    args = parser.parse_args(argv)
    try:
        if args.command == "extract":
            print(extract_converter(args.sdist, args.dest, args.cmake_args))
        else:
            print(converter_dir())
    except BughuntError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
