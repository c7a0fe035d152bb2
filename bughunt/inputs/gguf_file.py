"""A GGUF file checked before anything else reads it: a regular readable file, the GGUF magic, a version gguf-py
reads, every metadata entry and tensor description inside the file, every tensor's data inside the file, aligned and
not overlapping another, every tensor type one gguf-py can dequantize, and the model metadata (block count, embedding
length, head count, vocabulary) agreeing with the tensors. The header is walked with every read bounds-checked, so a
damaged length or a cut is reported with the entry it ends in (gguf.GGUFReader raises a bare IndexError or
ValueError there), in a tenth of the reader's time on a real vocabulary. `read_gguf` then opens a checked file with
gguf.GGUFReader, turning whatever it still raises into a BughuntError."""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bughunt.errors import BughuntError
from bughunt.inputs.files import check_regular_file

FIX = "The file is damaged or was not written by a GGUF writer: download it again, or convert the model again with llama.cpp's convert_hf_to_gguf.py."
MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 8  # arrays of arrays: deeper than any writer goes
# value type id -> (struct code, size); STRING (8) and ARRAY (9) have their own readers
SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4), 6: ("f", 4), 7: ("?", 1),
           10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
STRING, ARRAY = 8, 9
INTEGER_TYPES = {0, 1, 2, 3, 4, 5, 10, 11}


@dataclass
class Array:
    """A metadata array: the type of its items and how many there are (the items themselves are not kept)."""

    item_type: int
    count: int


@dataclass
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: the innermost (row) dimension first
    type_id: int
    offset: int  # from the start of the data section


@dataclass
class Layout:
    path: Path
    size: int
    version: int
    fields: dict[str, Any] = field(default_factory=dict)  # key -> int, float, bool, str or Array
    types: dict[str, int] = field(default_factory=dict)  # key -> value type id
    tensors: list[TensorInfo] = field(default_factory=list)
    alignment: int = 32
    data_start: int = 0


class _Cursor:
    """Reads a GGUF header front to back; every read is checked against the end of the file."""

    def __init__(self, path: Path, buf, order: str):
        self.path, self.buf, self.order, self.pos = path, buf, order, 0

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.buf) - self.pos:
            raise BughuntError(f"GGUF file {self.path} is truncated: {what} needs {n} bytes at offset {self.pos}, but the file "
                               f"ends at byte {len(self.buf)}. {FIX}")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw

    def unpack(self, code: str, what: str):
        size = struct.calcsize("<" + code)
        return struct.unpack(self.order + code, self.take(size, what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("Q", f"the length of {what}")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BughuntError(f"GGUF file {self.path}: {what} is not UTF-8 (byte 0x{raw[e.start]:02x} at offset "
                               f"{self.pos - n + e.start}). {FIX}") from None

    def room_for(self, count: int, least: int, what: str) -> None:
        """Refuse a count of items that could not fit in the rest of the file (each at least `least` bytes)."""
        left = len(self.buf) - self.pos
        if count * least > left:
            raise BughuntError(f"GGUF file {self.path}: {what} declares {count} items of at least {least} bytes each, but only "
                               f"{left} bytes follow: the file is truncated or the count is damaged. {FIX}")


def _value(cur: _Cursor, type_id: int, what: str, depth: int = 0) -> Any:
    if type_id in SCALARS:
        return cur.unpack(SCALARS[type_id][0], what)
    if type_id == STRING:
        return cur.string(what)
    if type_id == ARRAY and depth < MAX_NESTING:
        item_type = cur.unpack("I", f"the item type of {what}")
        count = cur.unpack("Q", f"the length of {what}")
        if item_type in SCALARS:
            cur.room_for(count, SCALARS[item_type][1], what)
            cur.pos += count * SCALARS[item_type][1]
        elif item_type in (STRING, ARRAY):
            cur.room_for(count, 8 if item_type == STRING else 12, what)
            for i in range(count):
                _value(cur, item_type, f"item {i} of {what}", depth + 1)
        else:
            raise BughuntError(f"GGUF file {cur.path}: {what} is an array of value type {item_type}, which GGUF does not "
                               f"define (0 to 12). {FIX}")
        return Array(item_type, count)
    nested = " (arrays nested too deeply)" if type_id == ARRAY else ""
    raise BughuntError(f"GGUF file {cur.path}: {what} has value type {type_id}{nested}, which GGUF does not define (0 to 12). {FIX}")


def _preamble(path: Path, buf) -> tuple[_Cursor, int, int, int]:
    """The cursor after magic, version and counts; (cursor, version, tensor count, metadata count)."""
    import gguf.gguf_reader

    if len(buf) < 4 or buf[:4] != MAGIC:
        start = bytes(buf[:4])
        raise BughuntError(f"{path} is not a GGUF file: it starts with {start!r}, not the GGUF magic {MAGIC!r}. Pass a .gguf "
                           f"file written by llama.cpp's tools, or a Hugging Face-format checkpoint directory.")
    cur = _Cursor(path, buf, "<")
    cur.take(4, "the magic")
    version = cur.unpack("I", "the GGUF version")
    if version & 0xFFFF == 0 and version:  # written on a machine of the other byte order, as gguf.GGUFReader reads it
        cur.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
    supported = list(gguf.gguf_reader.READER_SUPPORTED_VERSIONS)
    if version not in supported:
        raise BughuntError(f"GGUF file {path} is GGUF version {version}; gguf-py reads only versions "
                           f"{', '.join(map(str, supported))}. Convert the model again with a current llama.cpp "
                           "(convert_hf_to_gguf.py), or upgrade the gguf package if the file is newer.")
    n_tensors = cur.unpack("Q", "the tensor count")
    n_fields = cur.unpack("Q", "the metadata count")
    return cur, version, n_tensors, n_fields


def _metadata(cur: _Cursor, layout: Layout, count: int) -> None:
    cur.room_for(count, 13, "the metadata count")
    for i in range(count):
        key = cur.string(f"the name of metadata entry {i}")
        type_id = cur.unpack("I", f"the value type of metadata {key!r}")
        if key in layout.fields:
            raise BughuntError(f"GGUF file {cur.path}: metadata {key!r} appears twice. {FIX}")
        layout.fields[key] = _value(cur, type_id, f"metadata {key!r}")
        layout.types[key] = type_id
    if "general.alignment" in layout.fields:
        align = layout.fields["general.alignment"]
        if layout.types["general.alignment"] != 4 or align == 0 or align & (align - 1):
            raise BughuntError(f"GGUF file {cur.path}: general.alignment is {align!r}; expected a uint32 power of two. {FIX}")
        layout.alignment = align


def _tensor_infos(cur: _Cursor, layout: Layout, count: int) -> None:
    import gguf

    cur.room_for(count, 24, "the tensor count")
    seen: set[str] = set()
    for i in range(count):
        name = cur.string(f"the name of tensor {i}")
        what = f"tensor {name!r}"
        n_dims = cur.unpack("I", f"the dimension count of {what}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise BughuntError(f"GGUF file {cur.path}: {what} has {n_dims} dimensions; GGUF tensors have 1 to {MAX_DIMS}. {FIX}")
        dims = tuple(cur.unpack("Q", f"the shape of {what}") for _ in range(n_dims))
        type_id = cur.unpack("I", f"the type of {what}")
        offset = cur.unpack("Q", f"the data offset of {what}")
        if name in seen:
            raise BughuntError(f"GGUF file {cur.path}: two tensors are named {name!r}. {FIX}")
        seen.add(name)
        if 0 in dims or any(d >= 2**62 for d in dims):
            raise BughuntError(f"GGUF file {cur.path}: {what} has shape {list(dims)}; every dimension must be between 1 and "
                               f"2^62. {FIX}")
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
            block = gguf.GGML_QUANT_SIZES[qtype][0]
        except (ValueError, KeyError):
            raise BughuntError(f"GGUF file {cur.path}: {what} has tensor type {type_id}, which gguf-py "
                               f"{_gguf_version()} does not know. Upgrade the gguf package, or convert the model again.") from None
        if dims[0] % block:
            raise BughuntError(f"GGUF file {cur.path}: {what} has rows of {dims[0]} values, not a multiple of the "
                               f"{qtype.name} block size {block}. {FIX}")
        layout.tensors.append(TensorInfo(name, dims, type_id, offset))


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(unknown version)"


def tensor_bytes(t: TensorInfo) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.type_id)]
    n = 1
    for d in t.dims:
        n *= d
    return n // block * size


def _tensor_data(layout: Layout) -> None:
    """Every tensor's bytes aligned, inside the file, and its own."""
    spans = []
    for t in layout.tensors:
        start, n = layout.data_start + t.offset, tensor_bytes(t)
        if t.offset % layout.alignment:
            raise BughuntError(f"GGUF file {layout.path}: tensor {t.name!r} starts at data offset {t.offset}, not a multiple of "
                               f"the file's alignment {layout.alignment}. {FIX}")
        if start + n > layout.size:
            raise BughuntError(f"GGUF file {layout.path}: tensor {t.name!r} ({n} bytes at byte {start}) lies past the end of "
                               f"the file ({layout.size} bytes): the file is truncated or the tensor's offset is damaged. {FIX}")
        spans.append((start, start + n, t.name))
    spans.sort()
    for (s0, e0, a), (s1, e1, b) in zip(spans, spans[1:]):
        if s1 < e0:
            raise BughuntError(f"GGUF file {layout.path}: tensors {a!r} (bytes {s0} to {e0}) and {b!r} (bytes {s1} to {e1}) "
                               f"overlap; every tensor needs its own bytes. {FIX}")


def _dequantizable(layout: Layout) -> None:
    """Every tensor type one gguf-py can turn into float32 (tried on one block of zeros per type)."""
    import gguf
    import numpy as np

    for type_id in sorted({t.type_id for t in layout.tensors}):
        qtype = gguf.GGMLQuantizationType(type_id)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        try:
            gguf.quants.dequantize(np.zeros((1, size), np.uint8), qtype)
        except NotImplementedError:
            names = [t.name for t in layout.tensors if t.type_id == type_id]
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise BughuntError(f"GGUF file {layout.path}: {len(names)} tensor(s) ({shown}) are of type {qtype.name}, which "
                               f"gguf-py {_gguf_version()} cannot dequantize. Convert the model to a type it can (f32, f16, "
                               "bf16, q8_0, q4_0, q4_1, q5_0, q5_1, or a k-quant such as q4_k_m).") from None


_BLOCK = re.compile(r"^blk\.(\d+)\.")


def _integer(layout: Layout, key: str) -> int | None:
    """The value of an integer metadata entry; None when absent; a BughuntError when it is not an integer."""
    if key not in layout.fields:
        return None
    value = layout.fields[key]
    if layout.types[key] not in INTEGER_TYPES:
        shown = f"an array of {value.count}" if isinstance(value, Array) else repr(value)
        raise BughuntError(f"GGUF file {layout.path}: metadata {key!r} is {shown}; expected an integer. {FIX}")
    return value


def _model_metadata(layout: Layout) -> None:
    """The model's metadata against its tensors: block count, embedding width, heads, vocabulary."""
    arch = layout.fields.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise BughuntError(f"GGUF file {layout.path} has no general.architecture string, so nothing says what model it holds. {FIX}")
    problems = []
    blocks = _integer(layout, f"{arch}.block_count")
    present = sorted({int(m.group(1)) for t in layout.tensors if (m := _BLOCK.match(t.name))})
    if blocks is not None and present != list(range(blocks)):
        problems.append(f"{arch}.block_count is {blocks} but the tensors hold {_blocks(present)}")
    embd = _integer(layout, f"{arch}.embedding_length")
    heads = _integer(layout, f"{arch}.attention.head_count")
    token_embd = next((t for t in layout.tensors if t.name == "token_embd.weight"), None)
    if embd is not None and token_embd is not None and token_embd.dims[0] != embd:
        problems.append(f"{arch}.embedding_length is {embd} but token_embd.weight has rows of {token_embd.dims[0]}")
    if embd is not None and heads is not None and f"{arch}.attention.key_length" not in layout.fields and (heads == 0 or embd % heads):
        problems.append(f"{arch}.attention.head_count {heads} does not divide {arch}.embedding_length {embd} (and no "
                        f"{arch}.attention.key_length gives the head size)")
    problems += _vocabulary(layout, arch, token_embd)
    if problems:
        raise BughuntError(f"GGUF file {layout.path}: its metadata disagrees with its tensors: {'; '.join(problems)}. {FIX}")


def _blocks(present: list[int]) -> str:
    if not present:
        return "no blk.N. tensors"
    if present == list(range(len(present))):
        return f"{len(present)} blocks (blk.0 to blk.{present[-1]})"
    missing = sorted(set(range(present[-1] + 1)) - set(present))
    return f"blocks blk.0 to blk.{present[-1]} with blk.{', blk.'.join(map(str, missing[:5]))} missing"


def _vocabulary(layout: Layout, arch: str, token_embd: TensorInfo | None) -> list[str]:
    problems = []
    tokens = layout.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and not (isinstance(tokens, Array) and tokens.item_type == STRING):
        problems.append("tokenizer.ggml.tokens is not an array of strings")
        tokens = None
    rows = token_embd.dims[1] if token_embd is not None and len(token_embd.dims) > 1 else None
    if tokens is not None and rows is not None and tokens.count != rows:
        problems.append(f"tokenizer.ggml.tokens holds {tokens.count} tokens but token_embd.weight has {rows} rows")
    vocab = _integer(layout, f"{arch}.vocab_size")
    if vocab is not None and rows is not None and vocab != rows:
        problems.append(f"{arch}.vocab_size is {vocab} but token_embd.weight has {rows} rows")
    output = next((t for t in layout.tensors if t.name == "output.weight"), None)
    if output is not None and token_embd is not None and output.dims != token_embd.dims:
        problems.append(f"output.weight has shape {list(output.dims)} but token_embd.weight has {list(token_embd.dims)}")
    return problems


def read_layout(path: Path) -> Layout:
    """The header of GGUF file `path`, walked and bounds-checked (no tensor data is read)."""
    path = check_regular_file(Path(path), "GGUF file", "Pass a .gguf file.")
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:  # magic, version, two counts
                raise BughuntError(f"GGUF file {path} holds {size} bytes, too few for a GGUF header (24 bytes): the file is "
                                   f"empty or truncated. {FIX}")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _walk(path, buf, size)
    except OSError as e:
        raise BughuntError(f"GGUF file {path} cannot be read ({e.strerror or e}). Check the file and its permissions.") from None


def _walk(path: Path, buf, size: int) -> Layout:
    cur, version, n_tensors, n_fields = _preamble(path, buf)
    layout = Layout(path, size, version)
    _metadata(cur, layout, n_fields)
    _tensor_infos(cur, layout, n_tensors)
    layout.data_start = -(-cur.pos // layout.alignment) * layout.alignment
    return layout


def check_gguf(path: Path) -> None:
    """Raise a BughuntError naming the file, the problem and the fix when GGUF file `path` is not one bughunt can read."""
    layout = read_layout(path)
    _tensor_data(layout)
    _dequantizable(layout)
    _model_metadata(layout)


def read_gguf(path: Path):
    """gguf.GGUFReader over a checked file; anything it still raises becomes a BughuntError."""
    import gguf

    check_gguf(path)
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError, OSError) as e:
        raise BughuntError(f"GGUF file {path}: gguf-py {_gguf_version()} cannot read it ({type(e).__name__}: {e}). {FIX}") from None
