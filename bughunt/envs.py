"""The Python environments bughunt runs implementations in besides its own interpreter.

- An implementation's own environment: litgpt pins libraries that break this project's transformers, so it runs
  in `.venv-litgpt` beside the project's `.venv` (`make litgpt` creates it; BUGHUNT_LITGPT_PYTHON names another).
- Library-version environments: `hf==5.22.0` runs the hf implementation on transformers 5.22.0. The environment is
  created on first use in the user cache (`<cache>/envs`, BUGHUNT_ENVS to move it) and reused after: the library at
  the asked release, torch from the same wheel as the implementation's usual environment, and every other package
  pinned to the version that environment has, through a pip constraints file, so pip never backtracks.

Creating one is locked per environment (two runs asking for it at once build it once) and happens in a hidden
directory that is renamed into place only when the environment imports; a half-built one is never reused.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import functools
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bughunt.errors import BughuntError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MARKER = "bughunt-env.json"  # written last, inside the environment, before it is renamed into place
WORKER_PACKAGES = ("numpy", "ml-dtypes", "pydantic")  # what bughunt's worker imports besides the runner's library


@dataclass(frozen=True)
class Library:
    package: str  # the distribution installed at the asked release
    module: str  # imported to check a new environment works
    extras: tuple[str, ...] = ("torch",)  # other distributions its runner imports, at the usual environment's versions


# implementation (the part of the name before any "+variant") -> the library its release picks
LIBRARIES = {"hf": Library("transformers", "transformers", ("torch", "accelerate")),  # hf loads through a device_map
             "litgpt": Library("litgpt", "litgpt")}

# implementation -> (environment variable naming its interpreter, its default place under the project, how to create it)
OWN_ENVIRONMENTS = {"litgpt": ("BUGHUNT_LITGPT_PYTHON", ".venv-litgpt", "make litgpt")}


# -- an implementation's own environment ---------------------------------------------------------------------------

def own_python(name: str) -> str | None:
    """The interpreter of an implementation's own environment, or None when the implementation has none or it is
    not created."""
    if name not in OWN_ENVIRONMENTS:
        return None
    var, default, _ = OWN_ENVIRONMENTS[name]
    path = Path(os.environ.get(var) or PROJECT_ROOT / default / "bin" / "python")
    return str(path) if path.exists() else None


def require_own_python(name: str) -> str:
    python = own_python(name)
    if python is None:
        var, default, make = OWN_ENVIRONMENTS[name]
        where = os.environ.get(var) or PROJECT_ROOT / default / "bin" / "python"
        raise BughuntError(f"implementation '{name}' runs in its own virtual environment, and there is none at {where}. "
                           f"Create it with `{make}` in {PROJECT_ROOT} (a few minutes; it pins every package in "
                           f"requirements/{name}.txt), or set {var} to the python of an environment that has {name}.")
    return python


# -- choosing the interpreter of a run -----------------------------------------------------------------------------

def needs_worker(choice) -> bool:
    """Whether a choice runs in another interpreter than this one (so never in this process)."""
    return bool(choice.python or choice.version or choice.name in OWN_ENVIRONMENTS)


def refuse_in_process(choice, why: str) -> None:
    if needs_worker(choice):
        raise BughuntError(f"{choice.label} runs in another Python environment, so it needs a worker process, and {why}.")


def library_of(name: str) -> Library | None:
    return LIBRARIES.get(name.split("+")[0])


def check_version(name: str, version: str, text: str) -> None:
    """Refuse a NAME==VERSION whose implementation has no library-version environments (at parse time)."""
    if library_of(name) is None:
        known = ", ".join(f"{n}==VERSION ({lib.package})" for n, lib in LIBRARIES.items())
        raise BughuntError(f"'{text}': implementation '{name}' cannot be run at another library release. Known: {known}.")


def interpreter(choice) -> str | None:
    """The interpreter a choice's worker runs under (None: this one). A library-version environment must have been
    created by `prepare` first."""
    if choice.python:
        return choice.python
    if choice.version:
        return ensure(choice.name, choice.version, create=False)
    if choice.name in OWN_ENVIRONMENTS:
        return require_own_python(choice.name)
    return None


def refuse(choices, in_process: bool = False) -> None:
    """While a run is planned: refuse (exit 2) what cannot run here, without building anything."""
    for choice in choices:
        if in_process:
            refuse_in_process(choice, "--in-process runs every implementation in this interpreter; drop --in-process")
        if not choice.python and not choice.version and choice.name in OWN_ENVIRONMENTS:
            require_own_python(choice.name)


def prepare(choices, in_process: bool = False) -> None:
    """Before a run: refuse (exit 2) what cannot run, and create the library-version environments it needs."""
    refuse(choices, in_process)
    for choice in choices:
        if choice.version and not choice.python:
            ensure(choice.name, choice.version)


# -- library-version environments ----------------------------------------------------------------------------------

def root() -> Path:
    env = os.environ.get("BUGHUNT_ENVS")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("bughunt")) / "envs"


def _base_python(name: str) -> str:
    """The interpreter that runs the implementation at its usual release (whose packages a version env pins)."""
    return require_own_python(name) if name in OWN_ENVIRONMENTS else sys.executable


_SCAN = ("import importlib.metadata as m, json, platform; print(json.dumps([platform.python_version(), "
         "{d.metadata['Name']: d.version for d in m.distributions() if d.read_text('direct_url.json') is None}]))")


@functools.lru_cache(maxsize=None)  # an interpreter's packages do not change during a run; asked once per choice
def _installed(python: str) -> tuple[str, dict[str, str]]:
    """(python version, {distribution: version}) of an interpreter, leaving out packages installed from a path or URL
    (bughunt itself, editable installs): those are not on the registry."""
    if python == sys.executable:
        import platform

        return platform.python_version(), {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()
                                           if d.read_text("direct_url.json") is None}
    out = subprocess.run([python, "-c", _SCAN], capture_output=True, text=True)
    if out.returncode != 0:
        raise BughuntError(f"could not list the packages of {python}: {out.stderr.strip()[-500:]}")
    version, packages = json.loads(out.stdout)
    return version, packages


def _ours(path: Path) -> bool:
    """A directory bughunt made under the root: a complete environment, or one named like an environment or a build
    of one (half-built). Anything else there is left alone, whatever `remove --all` says."""
    return (path / MARKER).exists() or re.fullmatch(r"\.?[^/]+==[^/]+-py\d+\.\d+-torch[^/]+", path.name) is not None


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def env_name(package: str, version: str, python_version: str, torch_version: str) -> str:
    major_minor = ".".join(python_version.split(".")[:2])
    return f"{package}=={version}-py{major_minor}-torch{torch_version}"


def ensure(name: str, version: str, create: bool = True) -> str | None:
    """The interpreter for implementation `name` at library release `version`: None when this interpreter already
    has that release, the usual environment's when it has it, else a library-version environment (created when
    missing, if `create`)."""
    lib = library_of(name)
    base = _base_python(name)
    python_version, packages = _installed(base)
    have = {_norm(k): v for k, v in packages.items()}
    if have.get(_norm(lib.package)) == version:
        return None if base == sys.executable else base
    torch_version = have.get("torch")
    if torch_version is None:
        raise BughuntError(f"{base} has no torch, so there is no torch wheel to pin for {name}=={version}.")
    key = env_name(lib.package, version, python_version, torch_version)
    path = root() / key
    if (path / MARKER).exists():
        return str(path / "bin" / "python")
    if not create:
        raise BughuntError(f"the environment for {name}=={version} does not exist ({path}); create it with "
                           f"`bughunt envs create {name}=={version}`.")
    root().mkdir(parents=True, exist_ok=True)
    with open(root() / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run creating the same environment: wait for it, then reuse it
        if (path / MARKER).exists():
            return str(path / "bin" / "python")
        for stale in root().glob(f".{key}.build-*"):  # left by a creation that was killed; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if path.exists():  # a directory there without its marker was not made by bughunt's rename: never reuse it
            raise BughuntError(f"{path} exists but is not a complete bughunt environment (no {MARKER}). "
                               f"Remove it (`bughunt envs remove {key}`) and run again.")
        _create(lib, version, packages, base, python_version, torch_version, path)
    return str(path / "bin" / "python")


def _create(lib: Library, version: str, base_packages: dict[str, str], base: str, python_version: str,
            torch_version: str, path: Path) -> None:
    from bughunt import progress

    build = Path(tempfile.mkdtemp(prefix=f".{path.name}.build-", dir=path.parent))
    started = time.monotonic()
    print(f"bughunt: creating the environment {path.name} in {path.parent} (pip; about a minute on a warm pip cache) ...",
          file=sys.stderr, flush=True)
    try:
        with progress.task(f"{lib.package}=={version}", unit="step") as bar:
            bar.update(stage="creating the virtual environment")
            _run([sys.executable, "-m", "venv", "--without-pip", str(build)], "create a virtual environment")
            pins = {k: v for k, v in base_packages.items() if _norm(k) != _norm(lib.package)}
            pins["torch"] = torch_version
            bar.update(stage="reading the release's requirements")
            relaxed = _relax(lib, version, pins, build)
            constraints = build / "bughunt-constraints.txt"
            constraints.write_text("".join(f"{k}=={v}\n" for k, v in sorted(pins.items())))
            bar.update(stage="pip install")
            wanted = [f"{lib.package}=={version}", *lib.extras, *WORKER_PACKAGES]
            _run([sys.executable, "-m", "pip", "--python", str(build / "bin" / "python"), "install", "--no-input",
                  "--disable-pip-version-check", "-q", "-c", str(constraints), *wanted],
                 f"install {lib.package}=={version} with every other package pinned to {base}'s versions"
                 + (f" (but {', '.join(relaxed)}, which the release constrains)" if relaxed else ""),
                 hint=REGISTRY_HINT.format(lib.package))
            bar.update(stage="checking it imports")
            _run([str(build / "bin" / "python"), "-c", f"import {lib.module}, torch, numpy, ml_dtypes, pydantic"],
                 f"import {lib.module} in the new environment")
            _, installed = _installed(str(build / "bin" / "python"))
        meta = {"package": lib.package, "version": version, "python": python_version, "torch": torch_version, "base": base,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(time.monotonic() - started, 1), "relaxed": relaxed, "packages": installed}
        (build / MARKER).write_text(json.dumps(meta, indent=1))
        os.rename(build, path)  # atomic: the environment appears complete or not at all
    finally:
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)


def _relax(lib: Library, version: str, pins: dict[str, str], build: Path) -> dict[str, str]:
    """Drop the pins the release itself excludes (its Requires-Dist does not admit the usual environment's version),
    so pip takes a version the release accepts; everything else stays pinned. Returns {package: why} for the record.
    torch is never relaxed: a release that needs another torch is refused."""
    import zipfile
    from email.parser import Parser

    from packaging.requirements import Requirement

    download = build / ".download"
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "--disable-pip-version-check", "-q",
          "-d", str(download), f"{lib.package}=={version}"], f"download {lib.package}=={version}", hint=REGISTRY_HINT.format(lib.package))
    wheel = next(download.glob("*.whl"), None)
    relaxed: dict[str, str] = {}
    if wheel is not None:  # an sdist would need building to read; pip then reports any conflict itself
        with zipfile.ZipFile(wheel) as z:
            metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        for text in Parser().parsestr(metadata).get_all("Requires-Dist") or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            key = next((k for k in pins if _norm(k) == _norm(req.name)), None)
            if key is None or req.specifier.contains(pins[key], prereleases=True):
                continue
            if _norm(key) == "torch":
                raise BughuntError(f"{lib.package}=={version} needs torch{req.specifier}, and bughunt runs every version "
                                   f"of a library on the same torch ({pins[key]}). Compare that release on its own torch with @PYTHON.")
            relaxed[key] = f"{pins.pop(key)} in the usual environment; {lib.package} {version} needs {req.name}{req.specifier}"
    shutil.rmtree(download, ignore_errors=True)
    return relaxed


REGISTRY_HINT = ("Creating a library-version environment needs the package registry (PyPI, or the index your pip "
                 "configuration names), and the release must exist (`pip index versions {}`).")


def _run(cmd: list[str], what: str, hint: str = "") -> None:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        lines = [ln for ln in (out.stderr + out.stdout).splitlines() if ln.strip() and "is ignored: it is neither" not in ln]
        errors = [ln for ln in lines if "ERROR" in ln or "Error" in ln] or lines
        raise BughuntError(f"could not {what}: {' / '.join(errors[-4:]).strip()[:1200]}. {hint}".strip())


# -- listing and removing ------------------------------------------------------------------------------------------

@dataclass
class EnvInfo:
    name: str
    path: Path
    complete: bool
    size: int
    meta: dict


def _size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def list_envs() -> list[EnvInfo]:
    """Every environment under the root, complete or half-built (a creation under way or killed)."""
    if not root().is_dir():
        return []
    out = []
    for p in sorted(root().iterdir()):
        if not p.is_dir() or not _ours(p):
            continue
        marker = p / MARKER
        meta = json.loads(marker.read_text()) if marker.exists() else {}
        out.append(EnvInfo(p.name, p, bool(meta), _size(p), meta))
    return out


def _matches(info: EnvInfo, what: str) -> bool:
    if what in (info.name, str(info.path)):
        return True
    name, _, version = what.partition("==")
    lib = library_of(name)
    package = lib.package if lib else name
    return bool(version) and info.meta.get("package") == package and info.meta.get("version") == version


def remove(what: list[str], everything: bool = False) -> list[str]:
    """Remove environments named by directory name or NAME==VERSION (hf==5.22.0 or transformers==5.22.0); each is
    taken under its lock, so one being created is removed after its creation ends. Returns the names removed."""
    envs = list_envs()
    chosen = envs if everything else [e for e in envs if any(_matches(e, w) for w in what)]
    unmatched = [w for w in what if not any(_matches(e, w) for e in envs)]
    if unmatched:
        have = ", ".join(e.name for e in envs) or "none"
        raise BughuntError(f"no environment matches {', '.join(unmatched)} in {root()} (there: {have}). "
                           "Name one as `bughunt envs list` shows it, or as hf==VERSION.")
    removed = []
    for e in chosen:
        key = e.name.split(".build-")[0].lstrip(".")
        with open(root() / f".{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            shutil.rmtree(e.path, ignore_errors=True)
        removed.append(e.name)
    return removed


def format_list(envs: list[EnvInfo]) -> str:
    lines = [f"library-version environments in {root()} (BUGHUNT_ENVS to move; `bughunt envs remove NAME` to delete):"]
    if not envs:
        lines.append("  none")
    for e in envs:
        state = f"created {e.meta.get('created', '?')} in {e.meta.get('seconds', '?')} s" if e.complete \
            else "half-built (a creation under way, or one that was killed; never used)"
        lines.append(f"  {e.name}  {e.size / 2**30:.2f} GB  {state}")
        lines += [f"    not pinned to the usual environment: {k} ({why})" for k, why in e.meta.get("relaxed", {}).items()]
    for name in OWN_ENVIRONMENTS:
        python = own_python(name)
        lines.append(f"{name}'s own environment: {python or 'not created (' + OWN_ENVIRONMENTS[name][2] + ')'}")
    return "\n".join(lines)
