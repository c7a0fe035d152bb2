"""Where bughunt writes, and the rules that keep it from losing anyone's data.

An output directory (`--out` of compare, sweep, decode, render, ci, demo, tiny) is built in a temporary sibling
and moved into place only when complete, with a marker file (`.bughunt-output`) recording what wrote it. An
existing `--out` is replaced only when it is bughunt's own earlier output of the same sort (a report by a report,
a checkpoint by a checkpoint) or an empty directory; a file, the checkpoint itself, a directory inside or around
the checkpoint, or a non-empty directory bughunt did not write is refused before any work starts, as is a place
that cannot be created. A single output file (`lint --json`) replaces only an earlier file of the same schema, via
a temporary file and a rename. Everything is created with the user's umask.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterable

from bughunt.errors import BughuntError
from bughunt.interrupt import deferred

MARKER = ".bughunt-output"
MARKER_SCHEMA = "bughunt.output"
MARKER_VERSION = 1
REPORT_KINDS = ("compare", "sweep", "decode", "render", "demo", "ci")
CHECKPOINT_KINDS = ("tiny",)
MAX_OWN_FILE_BYTES = 64 * 2**20  # a file larger than this is not a bughunt JSON document we wrote
# Names bughunt's reports had before the marker existed: a directory holding only these (and traces/*.safetensors,
# traces/*.json) is an earlier bughunt report, and is replaced like one.
LEGACY_REPORT_FILES = frozenset({"result.json", "layers.png", "layers.svg", "positions.png", "heatmap.png", "decode.png",
                                 "report.html", "index.html", "junit.xml", "summary.md"})

Protected = tuple[str, Path]  # ("the checkpoint", path): a path an output must not be, lie in, or contain


def umask() -> int:
    """The process umask, read without changing it (other threads may be creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _sort(kind: str) -> str:
    return "checkpoint" if kind in CHECKPOINT_KINDS else "report"


def read_marker(directory: Path) -> dict | None:
    """The marker bughunt left in a directory it wrote, or None."""
    path = Path(directory) / MARKER
    try:
        if not path.is_file() or path.stat().st_size > MAX_OWN_FILE_BYTES:
            return None
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("schema") == MARKER_SCHEMA and isinstance(doc.get("kind"), str) else None


def _files(root: Path) -> list[str]:
    """Every entry below `root` that is not a directory, as relative paths (the marker itself left out)."""
    names = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_symlink() or not p.is_dir())
    return sorted(n for n in names if n != MARKER)


def _is_legacy_report(directory: Path) -> bool:
    """A report written before markers existed: every file a known report file, at least one result.json."""
    files = [Path(f) for f in _files(directory)]
    known = all(f.name in LEGACY_REPORT_FILES or (f.parent.name == "traces" and f.suffix in (".safetensors", ".json"))
                for f in files)
    return known and any(f.name == "result.json" for f in files)


def _marker_text(kind: str, files: list[str]) -> str:
    from importlib import metadata

    try:
        version = metadata.version("bughunt")
    except metadata.PackageNotFoundError:
        version = None
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return json.dumps({"schema": MARKER_SCHEMA, "version": MARKER_VERSION, "kind": kind, "created": created, "bughunt": version,
                       "files": files}) + "\n"


def _check_protected(flag: str, given: Path, real: Path, protect: Iterable[Protected]) -> None:
    for what, path in protect:
        try:
            p = Path(path).resolve()
        except RuntimeError:  # Python 3.11's resolve() on a symlink loop
            raise BughuntError(f"{what} {path} is a symbolic link loop. Replace the link with the real directory.") from None
        if real == p:
            raise BughuntError(f"{flag} {given} is {what} ({p}); writing there would replace it. Choose a path outside {what}.")
        if p in real.parents:
            raise BughuntError(f"{flag} {given} lies inside {what} ({p}); bughunt never writes into it. Choose a path outside {what}.")
        if real in p.parents:
            raise BughuntError(f"{flag} {given} contains {what} ({p}); replacing {given} would delete it. Choose a path that does "
                               f"not contain {what}.")


def _check_creatable(flag: str, given: Path, real: Path) -> None:
    """The nearest existing ancestor must be a directory we can create entries in (tried for real: permission bits
    say little to root, and nothing at all about /proc or a read-only mount)."""
    ancestor = real.parent
    while not ancestor.exists():
        if os.path.lexists(ancestor):
            raise BughuntError(f"{flag} {given} cannot be created: {ancestor} is a broken symbolic link. Fix the link or choose "
                               "another path.")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BughuntError(f"{flag} {given} cannot be created: {ancestor} is a file, not a directory. Choose a path below a directory.")
    try:
        probe = tempfile.mkdtemp(prefix=".bughunt-probe.", dir=ancestor)
        os.rmdir(probe)
    except OSError as e:
        raise BughuntError(f"{flag} {given} cannot be written: creating anything in {ancestor} fails ({e.strerror or e}). "
                           "Choose a writable directory.") from None


def _resolved(flag: str, path: str | Path) -> tuple[Path, Path]:
    """(the path as given, its real path), refusing an empty path, a symlink loop or a name the system cannot take."""
    if str(path) == "":
        raise BughuntError(f"{flag} is empty. Give a path, e.g. {flag} reports/run.")
    given = Path(path)
    try:
        real = given.resolve()
        real.exists()
        real.is_dir()
    except RuntimeError:  # Python 3.11's resolve() on a symlink loop
        raise BughuntError(f"{flag} {given} is a symbolic link loop. Fix the links or choose another path.") from None
    except (OSError, ValueError) as e:
        raise BughuntError(f"{flag} {given} cannot be used as a path: {getattr(e, 'strerror', None) or e}. Choose another path.") from None
    return given, real


def _refused_os_error(flag: str, path: str | Path, e: OSError) -> BughuntError:
    """An OSError met while looking at a path (a permission, a name too long) is a refusal, not a crash."""
    return BughuntError(f"{flag} {path} cannot be used: {e.strerror or e}. Choose another path.")


def check_output_dir(out: str | Path, kind: str, protect: Iterable[Protected] = (), flag: str = "--out") -> Path:
    """Refuse an output directory bughunt must not replace, or cannot create; return its resolved path.
    Call it before any work starts; `write_output_dir` calls it again just before replacing anything."""
    try:
        return _check_output_dir(out, kind, list(protect), flag)
    except OSError as e:
        raise _refused_os_error(flag, out, e) from None


def _check_output_dir(out: str | Path, kind: str, protect: list[Protected], flag: str) -> Path:
    given, real = _resolved(flag, out)
    if real.exists() and not real.is_dir():
        raise BughuntError(f"{flag} {given} is a file, not a directory. bughunt writes a directory of outputs; choose a new "
                           "directory (the file was left as it was).")
    _check_protected(flag, given, real, protect)
    if real.is_dir():
        marker = read_marker(real)
        if marker is None:
            try:
                empty = not any(real.iterdir())
            except OSError as e:
                raise BughuntError(f"{flag} {given} cannot be read ({e.strerror or e}). Choose another directory.") from None
            if not empty and not (_sort(kind) == "report" and _is_legacy_report(real)):
                raise BughuntError(f"{flag} {given} is a non-empty directory that bughunt did not write (it has no {MARKER} file). "
                                   f"bughunt replaces only its own earlier output: choose a new or empty directory, or move "
                                   f"{given} aside yourself.")
        elif _sort(marker["kind"]) != _sort(kind):
            raise BughuntError(f"{flag} {given} holds a bughunt {marker['kind']} output, which a {kind} run does not replace. "
                               "Choose another directory.")
        elif isinstance(marker.get("files"), list):
            added = sorted(set(_files(real)) - set(marker["files"]))
            if added:
                shown = ", ".join(added[:5]) + (f" and {len(added) - 5} more" if len(added) > 5 else "")
                raise BughuntError(f"{flag} {given} holds bughunt's earlier output plus files bughunt did not write ({shown}); "
                                   f"replacing it would delete them. Move them aside, or choose another directory.")
    _check_creatable(flag, given, real)
    return real


def _apply_umask(root: Path) -> None:
    """Give everything below `root` the modes the umask asks for: libraries that write through temporary files
    (safetensors, mkstemp) leave 0600 behind, and mkdtemp makes 0700 folders."""
    mask = umask()
    os.chmod(root, 0o777 & ~mask)
    for p in root.rglob("*"):
        if p.is_symlink():
            continue
        if p.is_dir():
            os.chmod(p, 0o777 & ~mask)
        else:
            executable = p.stat().st_mode & 0o111
            os.chmod(p, (0o666 | (0o111 if executable else 0)) & ~mask)


def _created_parents(real: Path) -> list[Path]:
    missing = []
    p = real.parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    return missing


def _remove_if_empty(dirs: list[Path]) -> None:
    for d in dirs:  # innermost first
        try:
            d.rmdir()
        except OSError:
            return


def write_output_dir(out: str | Path, kind: str, write: Callable[[Path], None], protect: Iterable[Protected] = (),
                     flag: str = "--out") -> Path:
    """Build the output in a temporary sibling (`.{name}.XXXX`) by calling write(tmp), add the marker, and move it
    into place: a failed or interrupted run leaves nothing, and an earlier output at `out` survives until the new
    one is complete. Returns the resolved output path."""
    protect = list(protect)
    real = check_output_dir(out, kind, protect, flag)
    made = _created_parents(real)
    real.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}.", dir=real.parent))
    done = False
    try:
        write(tmp)
        (tmp / MARKER).write_text(_marker_text(kind, _files(tmp)), encoding="utf-8")
        _apply_umask(tmp)
        with deferred():
            check_output_dir(out, kind, protect, flag)  # something may have appeared there while we worked
            if real.exists():
                old = real.with_name(f".{real.name}.old.{uuid.uuid4().hex[:8]}")
                os.rename(real, old)
                try:
                    os.rename(tmp, real)
                except OSError:
                    os.rename(old, real)  # put the earlier output back
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, real)
            done = True
    finally:
        with deferred():
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            if not done:
                _remove_if_empty(made)
    return real


def _is_own_file(path: Path, schema: str) -> bool:
    try:
        if not path.is_file() or path.stat().st_size > MAX_OWN_FILE_BYTES:
            return False
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("schema") == schema


def check_output_file(path: str | Path, schema: str, protect: Iterable[Protected] = (), flag: str = "--json") -> Path:
    """Refuse a single output file that would overwrite something bughunt did not write (anything but a JSON
    document with the same `schema`), or that cannot be created; return its resolved path."""
    try:
        return _check_output_file(path, schema, list(protect), flag)
    except OSError as e:
        raise _refused_os_error(flag, path, e) from None


def _check_output_file(path: str | Path, schema: str, protect: list[Protected], flag: str) -> Path:
    given, real = _resolved(flag, path)
    if real.is_dir():
        raise BughuntError(f"{flag} {given} is a directory; give a file name, e.g. {given / 'lint.json'}.")
    _check_protected(flag, given, real, protect)
    if os.path.lexists(real) and not _is_own_file(real, schema):
        raise BughuntError(f"{flag} {given} exists and is not a {schema} document bughunt wrote; it would be overwritten. "
                           "Choose a new file name, or remove the file yourself.")
    _check_creatable(flag, given, real)
    return real


def write_output_file(path: str | Path, text: str, schema: str, protect: Iterable[Protected] = (), flag: str = "--json") -> Path:
    """Write `text` to a temporary file beside `path` and rename it into place (never a half-written file)."""
    protect = list(protect)
    real = check_output_file(path, schema, protect, flag)
    made = _created_parents(real)
    real.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent)
    tmp = Path(name)
    done = False
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask())
            f.write(text)
        with deferred():
            check_output_file(path, schema, protect, flag)
            os.replace(tmp, real)
            done = True
    finally:
        with deferred():
            if tmp.exists():
                tmp.unlink()
            if not done:
                _remove_if_empty(made)
    return real


def describe_written(out: Path) -> str:
    """'wrote OUT: a, b, traces/ (4 files)': exactly what is in a finished output directory."""
    out = Path(out)
    parts = []
    for p in sorted(out.iterdir()):
        if p.name == MARKER:
            continue
        if p.is_dir():
            n = sum(1 for q in p.rglob("*") if q.is_file())
            parts.append(f"{p.name}/ ({n} file{'s' if n != 1 else ''})")
        else:
            parts.append(p.name)
    return f"wrote {out}: {', '.join(parts) if parts else 'nothing'}"
