"""Token ids from `--tokens` and `--tokens-file`: non-negative integers that fit in int64, in one or more rows of
equal length. A JSON token file is a list of ids or a list of rows (checked with pydantic); a text file holds one row
per line, ids separated by commas or spaces."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field, TypeAdapter, ValidationError

from bughunt.errors import BughuntError
from bughunt.inputs.config import MAX_TOKEN_ID
from bughunt.inputs.files import decode_utf8, parse_json, read_bytes, validation_message

MAX_TOKEN_FILE_BYTES = 64 * 1024 * 1024
FILE_FIX = "Write a JSON list of ids ([2, 17, 99]) or of equal-length rows ([[2, 17], [2, 99]]), or one row of ids per line."
TokenId = Annotated[int, Field(strict=True, ge=0, le=MAX_TOKEN_ID)]
_ROWS = TypeAdapter(Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)])
_ROW = TypeAdapter(Annotated[list[TokenId], Field(min_length=1)])
_ID = re.compile(r"[+-]?[0-9]+")


def _array(rows: list[list[int]], source: str) -> np.ndarray:
    lengths = sorted({len(r) for r in rows})
    if len(lengths) != 1:
        raise BughuntError(f"{source}: every row must have the same length; found lengths {lengths}. Pad or trim the rows.")
    return np.asarray(rows, dtype=np.int64)


def parse_token_text(text: str, source: str = "--tokens") -> np.ndarray:
    """'2,17,99' -> [[2, 17, 99]]; rows separated by ';' (or newlines), ids by commas or whitespace."""
    rows = []
    for r, row in enumerate(re.split(r"[;\n]", text)):
        items = [t for t in re.split(r"[,\s]+", row.strip()) if t]
        if not items:
            continue
        ids = []
        for i, item in enumerate(items):
            if not _ID.fullmatch(item):
                raise BughuntError(f"{source}: row {r} item {i} is {item[:40]!r}; expected a token id (a non-negative integer). "
                                   "Give comma-separated integers (rows separated by ';'), e.g. --tokens 2,17,99.")
            value = int(item)
            if not 0 <= value <= MAX_TOKEN_ID:
                raise BughuntError(f"{source}: row {r} item {i} is {item[:40]}; token ids are integers from 0 to {MAX_TOKEN_ID} "
                                   "(and below the checkpoint's vocab_size). Fix the id.")
            ids.append(value)
        rows.append(ids)
    if not rows:
        raise BughuntError(f"{source} is empty: give at least one token id, e.g. --tokens 2,17,99.")
    return _array(rows, source)


def read_token_file(path: Path) -> np.ndarray:
    path = Path(path)
    what = "--tokens-file"
    raw = read_bytes(path, what, FILE_FIX, MAX_TOKEN_FILE_BYTES)
    if b"\x00" in raw:
        raise BughuntError(f"{what} {path} holds NUL bytes, so it is binary, not a list of token ids. {FILE_FIX}")
    text = decode_utf8(raw, path, what, FILE_FIX).strip()
    if not text:
        raise BughuntError(f"{what} {path} is empty. {FILE_FIX}")
    if text.startswith(("[", "{", '"')) or text in ("null", "true", "false"):
        doc = parse_json(text, path, what, FILE_FIX)
        adapter = _ROW if isinstance(doc, list) and doc and not isinstance(doc[0], list) else _ROWS
        try:
            rows = adapter.validate_python(doc)
        except ValidationError as e:
            raise BughuntError(validation_message(e, f"{what} {path}", FILE_FIX, prefix="ids")) from None
        return _array([rows] if adapter is _ROW else rows, f"{what} {path}")
    return parse_token_text(text, f"{what} {path}")


def check_token_range(tokens: np.ndarray, vocab_size: int) -> None:
    """Refuse ids outside the checkpoint's vocabulary before any implementation indexes its embedding with them."""
    if tokens.size == 0:
        raise BughuntError("no input tokens: pass at least one token id.")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise BughuntError(f"token ids must lie in [0, {vocab_size}) for this checkpoint (vocab_size); got [{tokens.min()}, "
                           f"{tokens.max()}]. Use ids the checkpoint's tokenizer produces.")
