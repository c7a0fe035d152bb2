"""Read and write safetensors files with numpy only (bfloat16 via ml_dtypes), so the reference
path never needs torch and never unpickles anything. Tensors are read memory-mapped (nothing is loaded
until it is used) and written as a stream (`SafetensorsWriter`: one tensor at a time, never all in memory)."""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from bughunt.errors import BughuntError
from bughunt.inputs.files import check_regular_file
from bughunt.inputs.safetensors_header import validate_header

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file: name -> {dtype, shape, data_offsets}, plus __metadata__."""
    check_regular_file(path, "weight file", "Every weight file must be a readable safetensors file.")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) != 8:
                raise BughuntError(f"{path} is not a safetensors file (shorter than 8 bytes). Re-export the weights with save_pretrained(safe_serialization=True).")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise BughuntError(f"{path} is not a safetensors file (header length {n} is implausible). Re-export the weights with save_pretrained(safe_serialization=True).")
            if n > size - 8:
                raise BughuntError(f"{path}: the header declares {n} bytes but the file holds only {size - 8} after its length "
                                   "field: the file is truncated. Download or export it again.")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise BughuntError(f"{path} has a corrupt safetensors header ({type(e).__name__}: {e}). Re-export the weights.") from None
    except OSError as e:
        raise BughuntError(f"{path} cannot be read ({e.strerror or e}). Check the file and its permissions.") from None
    return validate_header(path, header, n, size, {name: dt.itemsize for name, dt in _DTYPES.items()})


def read_safetensors(path: Path, names: set[str] | None = None) -> dict[str, np.ndarray]:
    """Load tensors (all, or only `names`) from one safetensors file into memory, in their stored dtype."""
    return {name: np.array(arr) for name, arr in map_safetensors(path).items() if names is None or name in names}


def map_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file as a read-only memory-mapped array in its stored dtype: the bytes are
    read from disk only when (and as far as) an array is used."""
    path = Path(path)
    header = read_header(path)
    hlen = 8 + struct.unpack("<Q", open(path, "rb").read(8))[0]
    size = path.stat().st_size
    out: dict[str, np.ndarray] = {}
    raw = np.memmap(path, dtype=np.uint8, mode="r") if size > hlen else np.zeros(0, np.uint8)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise BughuntError(f"{path}: tensor {name} has dtype {info['dtype']}, which bughunt cannot read. Convert the checkpoint to float32, bfloat16 or float16.")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - start != expected or hlen + end > size:
            raise BughuntError(f"{path}: tensor {name} is truncated or its offsets disagree with its shape ({end - start} bytes "
                               f"at offset {start}, expected {expected}, file holds {size - hlen}). The file is damaged; export it again.")
        out[name] = raw[hlen + start: hlen + end].view(dtype).reshape(shape)
    return out


def release(arr: np.ndarray) -> None:
    """Drop a memory-mapped array's pages from this process's resident memory once it has been used (the OS page
    cache keeps them, so reading it again is cheap). Without this, every tensor ever touched would count towards
    the process's RSS until the file is unmapped. Arrays that are not memory-mapped are left alone."""
    mm = getattr(arr, "_mmap", None)
    if mm is None or not isinstance(arr, np.ndarray) or arr.nbytes == 0:
        return
    view = np.frombuffer(mm, dtype=np.uint8)
    start = arr.__array_interface__["data"][0] - view.__array_interface__["data"][0]
    del view
    if not 0 <= start < len(mm):
        return
    page = mmap.PAGESIZE
    first = start // page * page
    last = min(len(mm), -(-(start + arr.nbytes) // page) * page)
    mm.madvise(mmap.MADV_DONTNEED, first, last - first)


class SafetensorsWriter:
    """Write tensors to a safetensors file one at a time, as they are produced. Room for the header is reserved at the
    start and filled in by `close()` (the format allows trailing spaces in the header); if the reservation is too
    small, the data is copied once behind a larger header. The file appears at `path` only when complete."""

    def __init__(self, path: Path, expected_tensors: int = 64):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.reserved = 256 + 160 * max(1, expected_tensors)
        self.reserved += (8 - self.reserved % 8) % 8
        self.file = open(self.tmp, "wb+")
        self.file.write(b"\0" * (8 + self.reserved))
        self.header: dict = {}
        self.offset = 0

    def add(self, name: str, arr: np.ndarray) -> None:
        """Append one tensor (streamed from its buffer; a memory-mapped array is copied in bounded chunks)."""
        self.allocate(name, arr.shape, arr.dtype)
        a = np.asarray(arr)
        if a.ndim and a.shape[0] > 1 and a.nbytes > 64 << 20:  # big: write slab by slab so no full copy is made
            step = max(1, (64 << 20) // max(1, a[0].nbytes))
            for i in range(0, a.shape[0], step):
                self.file.write(np.ascontiguousarray(a[i:i + step]).tobytes())
        else:
            self.file.write(np.ascontiguousarray(a).tobytes())

    def allocate(self, name: str, shape: tuple[int, ...], dtype) -> tuple[int, int]:
        """Reserve a tensor's place; returns (file offset, byte length). `add` fills it at once; `writable` maps it
        so a producer can fill it piece by piece (e.g. logits computed a vocabulary chunk at a time)."""
        dtype = np.dtype(dtype)
        if dtype not in _NAMES:
            raise BughuntError(f"cannot write tensor {name} of dtype {dtype} to safetensors")
        if name in self.header:
            raise ValueError(f"tensor {name} written twice")
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self.header[name] = {"dtype": _NAMES[dtype], "shape": [int(d) for d in shape], "data_offsets": [self.offset, self.offset + n]}
        start = 8 + self.reserved + self.offset
        self.offset += n
        return start, n

    def writable(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A writable memory-mapped array for one tensor, backed by its place in the file."""
        start, n = self.allocate(name, shape, dtype)
        self.file.truncate(start + n)
        self.file.seek(0, 2)
        if n == 0:
            return np.zeros(shape, dtype)
        return np.memmap(self.file, dtype=np.dtype(dtype), mode="r+", offset=start, shape=tuple(shape))

    def close(self, metadata: dict[str, str] | None = None) -> Path:
        header = dict(self.header)
        if metadata:
            header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}, **header}
        hbytes = json.dumps(header, separators=(",", ":")).encode()
        self.file.flush()
        if len(hbytes) <= self.reserved:
            self.file.seek(0)
            self.file.write(struct.pack("<Q", self.reserved) + hbytes + b" " * (self.reserved - len(hbytes)))
            self.file.close()
        else:  # header outgrew its reservation: copy the data once behind a bigger header
            hbytes += b" " * ((8 - len(hbytes) % 8) % 8)
            bigger = self.tmp.with_name(self.tmp.name + "2")
            with open(bigger, "wb") as g:
                g.write(struct.pack("<Q", len(hbytes)) + hbytes)
                self.file.seek(8 + self.reserved)
                while chunk := self.file.read(64 << 20):
                    g.write(chunk)
            self.file.close()
            bigger.replace(self.tmp)
        self.tmp.replace(self.path)
        return self.path

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write numpy arrays to a safetensors file (atomically: a temporary file is renamed into place)."""
    writer = SafetensorsWriter(path, len(tensors))
    try:
        for name, arr in tensors.items():
            writer.add(name, np.asarray(arr))
    except BaseException:
        writer.abort()
        raise
    writer.close(metadata)
