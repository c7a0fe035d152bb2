"""Read and write safetensors files with numpy only (bfloat16 via ml_dtypes), so the reference
path never needs torch and never unpickles anything."""

from __future__ import annotations

import json
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
    """Load tensors (all, or only `names`) from one safetensors file as numpy arrays in their stored dtype."""
    path = Path(path)
    header = read_header(path)
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        base = 8 + hlen
        for name, info in header.items():
            if name == "__metadata__" or (names is not None and name not in names):
                continue
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise BughuntError(f"{path}: tensor {name} has dtype {info['dtype']}, which bughunt cannot read. Convert the checkpoint to float32, bfloat16 or float16.")
            start, end = info["data_offsets"]
            f.seek(base + start)
            buf = f.read(end - start)
            shape = tuple(info["shape"])
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if len(buf) != expected:
                raise BughuntError(f"{path}: tensor {name} is truncated ({len(buf)} of {expected} bytes). The file is damaged; download or export it again.")
            out[name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
    return out


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write numpy arrays to a safetensors file (atomically: a temporary file is renamed into place)."""
    path = Path(path)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    blobs = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _NAMES:
            raise BughuntError(f"cannot write tensor {name} of dtype {arr.dtype} to safetensors")
        b = arr.tobytes()
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * ((8 - len(hbytes) % 8) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for b in blobs:
            f.write(b)
    tmp.replace(path)
