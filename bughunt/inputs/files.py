"""Reading a user's file safely: it exists, is a regular file (not a directory, not a dangling link or a symlink
loop), is not absurdly large, decodes as UTF-8 and parses as JSON; and turning a pydantic ValidationError into one
message that names the file, the field, what was found and what was expected."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bughunt.errors import BughuntError

MAX_TEXT_BYTES = 256 * 1024 * 1024  # no text file bughunt reads (configs, indexes, results, token lists) is near this


def check_regular_file(path: Path, what: str, fix: str) -> Path:
    """`path` itself if it can be opened as a regular file; otherwise a BughuntError saying why."""
    path = Path(path)
    if not os.path.lexists(path):
        raise BughuntError(f"{what} {path} does not exist. {fix}")
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python 3.11)
        kind = "a symlink loop" if "loop" in str(e).lower() or getattr(e, "errno", None) == 40 else "a link that cannot be followed"
        raise BughuntError(f"{what} {path} is {kind} ({e}). Replace it with the real file. {fix}") from None
    if resolved.is_dir():
        raise BughuntError(f"{what} {path} is a directory, expected a file. {fix}")
    if not resolved.is_file():
        raise BughuntError(f"{what} {path} is not a regular file (a device, socket or pipe). {fix}")
    return path


def read_bytes(path: Path, what: str, fix: str, limit: int = MAX_TEXT_BYTES) -> bytes:
    path = check_regular_file(path, what, fix)
    try:
        size = path.stat().st_size
        if size > limit:
            raise BughuntError(f"{what} {path} is {size} bytes; bughunt reads at most {limit} bytes for this kind of file. {fix}")
        return path.read_bytes()
    except OSError as e:
        raise BughuntError(f"{what} {path} cannot be read ({e.strerror or e}). Check its permissions. {fix}") from None


def decode_utf8(raw: bytes, path: Path, what: str, fix: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BughuntError(f"{what} {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                           f"expected a UTF-8 text file. {fix}") from None


def read_text(path: Path, what: str, fix: str, limit: int = MAX_TEXT_BYTES) -> str:
    return decode_utf8(read_bytes(path, what, fix, limit), Path(path), what, fix)


def parse_json(text: str, path: Path, what: str, fix: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BughuntError(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}). {fix}") from None
    except RecursionError:
        raise BughuntError(f"{what} {path} nests JSON too deeply to be a {what}. {fix}") from None


def read_json(path: Path, what: str, fix: str, limit: int = MAX_TEXT_BYTES) -> Any:
    return parse_json(read_text(path, what, fix, limit), Path(path), what, fix)


def json_type(v: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(v), type(v).__name__)


def found(v: Any, limit: int = 60) -> str:
    if v is None:
        return "null"
    text = repr(v)
    return f"{json_type(v)} {text if len(text) <= limit else text[:limit] + '...'}"


def location(loc: tuple) -> str:
    """('layers', 0, 'name') -> 'layers[0].name'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _expected(msg: str) -> str:
    msg = re.sub(r" or instance of \w+", "", msg).replace("a valid dictionary", "an object").replace("a valid tuple", "a list [start, end]")
    for lead in ("Input should be ", "Value should be ", "Value error, "):
        if msg.startswith(lead):
            return msg[len(lead):]
    return msg[:1].lower() + msg[1:]


def validation_message(err: ValidationError, source: str, fix: str, prefix: str = "", limit: int = 4) -> str:
    """One message for a pydantic ValidationError: each failing field with what was found and what was expected."""
    parts = []
    errors = err.errors(include_url=False)
    # pydantic reports one error per union branch; keep the first per field so the message stays readable
    seen: set[str] = set()
    for e in errors:
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p in ("function-after", "function-plain", "tagged-union"))))
        where = location(loc) if loc else ""
        field = prefix + where if not prefix or where.startswith("[") or not where else f"{prefix}.{where}"
        if field in seen:
            continue
        seen.add(field)
        subject = f"field '{field}'" if field else "the value"
        if e["type"] == "missing":
            parts.append(f"{subject} is missing")
        else:
            parts.append(f"{subject} is {found(e.get('input'))}; expected {_expected(e['msg'])}")
    more = f"; and {len(seen) - limit} more" if len(seen) > limit else ""
    return f"{source}: " + "; ".join(parts[:limit]) + more + f". {fix}"
