"""A safetensors header against the bytes actually in the file, before any tensor is read: the header is a JSON
object of {name: {dtype, shape, data_offsets}} (plus a string-to-string __metadata__), every dtype is one bughunt
can read, every shape's byte count equals its offsets, and the offsets tile the data section exactly (sorted, no
overlap, no hole, nothing past the end of the file)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, TypeAdapter, ValidationError

from bughunt.errors import BughuntError
from bughunt.inputs.files import found, validation_message

FIX = "The file is damaged or was not written by a safetensors writer; download or export it again (save_pretrained(safe_serialization=True))."

Offset = Annotated[int, Field(strict=True, ge=0)]


class TensorEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dtype: StrictStr
    shape: list[Annotated[int, Field(strict=True, ge=0)]]
    data_offsets: tuple[Offset, Offset]


_METADATA = TypeAdapter(dict[StrictStr, StrictStr])


def validate_header(path: Path, header: Any, header_len: int, file_size: int, itemsizes: dict[str, int]) -> dict:
    """Return the header when it describes exactly the bytes in the file; otherwise raise a BughuntError naming the
    tensor and field. `itemsizes` maps each dtype bughunt can read to its size in bytes."""
    if not isinstance(header, dict):
        raise BughuntError(f"{path}: the safetensors header is {found(header)}; expected a JSON object mapping tensor names "
                           f"to {{dtype, shape, data_offsets}}. {FIX}")
    data_len = file_size - 8 - header_len
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            try:
                _METADATA.validate_python(info)
            except ValidationError as e:
                raise BughuntError(validation_message(e, f"{path}: header", FIX, prefix="__metadata__")) from None
            continue
        try:
            entry = TensorEntry.model_validate(info)
        except ValidationError as e:
            raise BughuntError(validation_message(e, f"{path}: tensor {name!r}", FIX)) from None
        if entry.dtype not in itemsizes:
            raise BughuntError(f"{path}: tensor {name!r} has dtype {entry.dtype!r}, which bughunt cannot read; expected one of "
                               f"{', '.join(itemsizes)}. Convert the checkpoint to float32, bfloat16 or float16.")
        start, end = entry.data_offsets
        if end < start:
            raise BughuntError(f"{path}: tensor {name!r} has data_offsets [{start}, {end}], which end before they start. {FIX}")
        want = math.prod(entry.shape) * itemsizes[entry.dtype]
        if end - start != want:
            raise BughuntError(f"{path}: tensor {name!r} declares shape {entry.shape} of {entry.dtype} ({want} bytes) but its "
                               f"data_offsets [{start}, {end}] span {end - start} bytes. {FIX}")
        if end > data_len:
            raise BughuntError(f"{path}: tensor {name!r} ends at byte {end} of the data section, but the file holds only "
                               f"{max(data_len, 0)} bytes of data: the file is truncated. {FIX}")
        spans.append((start, end, name))
    spans.sort()
    at = 0
    for start, end, name in spans:
        if start < at:
            other = next(n for s, e, n in spans if s < at and e > start and n != name)
            raise BughuntError(f"{path}: tensors {other!r} and {name!r} overlap (data_offsets reach byte {at} and start at "
                               f"{start}); every tensor needs its own bytes. {FIX}")
        if start > at:
            raise BughuntError(f"{path}: bytes {at} to {start} of the data section belong to no tensor (a hole before "
                               f"{name!r}). {FIX}")
        at = end
    if at != data_len:
        raise BughuntError(f"{path}: the tensors cover {at} bytes of data but the file holds {data_len} after its header; "
                           f"{data_len - at} bytes belong to no tensor. {FIX}")
    return header
