"""The reference streams its weights: read lazily from memory-mapped (and sharded) safetensors files, converted into
reused buffers, attention and logits computed in blocks. Each streamed path gives exactly what the in-memory path
gives."""

import numpy as np
import pytest

import reference_impls
from bughunt.checkpoint import load_weights, weight_files
from bughunt.implementations.reference import ReferenceRunner
from bughunt.safetensors_io import map_safetensors, write_safetensors
from bughunt.spec import load_spec
from bughunt.tiny import TINY_FAMILIES
from reference_impls import Policy


def in_memory_forward(checkpoint, dtype, tokens):
    """The reference as it ran before streaming: every weight a plain in-memory array, every point kept in memory."""
    spec = load_spec(checkpoint)
    weights = {k: np.array(v) for k, v in load_weights(checkpoint, spec).items()}
    return reference_impls.forward(weights, spec, tokens, Policy(dtype=dtype))


@pytest.mark.parametrize("dtype", ["fp64", "bf16"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_streamed_reference_is_bit_identical_to_the_in_memory_one(family, dtype, tiny, tokens, tmp_path):
    expected = in_memory_forward(tiny[family], dtype, tokens)
    with ReferenceRunner(tiny[family], load_spec(tiny[family]), dtype) as runner:
        streamed = runner.run(tokens, stem=tmp_path / "ref")
    assert (tmp_path / "ref.safetensors").exists() and streamed.stem == tmp_path / "ref"
    assert isinstance(streamed.arrays["logits"], np.memmap)  # read back from disk, not held in memory
    assert sorted(streamed.arrays) == sorted(expected)
    for point, array in expected.items():
        np.testing.assert_array_equal(streamed.arrays[point], array, err_msg=point)


def test_small_chunks_change_nothing_but_the_number_of_steps(tiny, tokens, monkeypatch):
    """Attention in query blocks and logits in vocabulary chunks agree with one big block to float64 precision."""
    from reference_impls import _numerics

    checkpoint = tiny["gemma2"]  # soft-caps and sliding windows go through the blocked paths too
    whole = in_memory_forward(checkpoint, "fp64", tokens)
    monkeypatch.setattr(_numerics, "CHUNK_BYTES", 1)  # one query row, one vocabulary row per step
    blocked = in_memory_forward(checkpoint, "fp64", tokens)
    for point in whole:
        np.testing.assert_allclose(blocked[point], whole[point], rtol=1e-12, atol=1e-12, err_msg=point)


def test_reference_reads_weights_lazily_from_memory_mapped_files(tiny):
    weights = load_weights(tiny["llama"], load_spec(tiny["llama"]))
    assert all(isinstance(v, np.memmap) for v in weights.values())
    assert all(not v.flags.writeable for v in weights.values())


def test_sharded_weights_are_mapped_across_files(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny["qwen2"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    (tmp_path / "sharded" / "config.json").write_text((tiny["qwen2"] / "config.json").read_text())
    assert len(weight_files(tmp_path / "sharded")) > 2
    tokens = np.array([[2, 5, 9, 11]])
    a = in_memory_forward(tiny["qwen2"], "fp64", tokens)
    b = in_memory_forward(tmp_path / "sharded", "fp64", tokens)
    for p in a:
        np.testing.assert_array_equal(a[p], b[p])
    write_safetensors(tmp_path / "copy.safetensors", load_weights(tmp_path / "sharded"))  # memmaps stream out too
    assert set(map_safetensors(tmp_path / "copy.safetensors")) >= set(load_weights(tiny["qwen2"])) - {"lm_head.weight"}


def test_weight_buffers_are_reused_only_once_nothing_holds_them():
    from reference_impls._weights import Buffers

    buffers = Buffers()
    a = buffers.take((4, 3))
    b = buffers.take((4, 3))
    assert a is not b  # `a` is still held
    view = b[1:]
    del b
    c = buffers.take((4, 3))
    assert c is not a and not np.shares_memory(c, view)  # a view keeps its buffer from reuse
    del a
    assert buffers.take((4, 3)) is not c
    stored = np.arange(12, dtype=np.float32).reshape(4, 3)
    converted = buffers.convert(stored)
    assert converted.dtype == np.float64 and np.array_equal(converted, stored)
    f64 = np.ones((2, 2))
    assert buffers.convert(f64) is f64  # float64 is used as it is


def test_large_conversions_split_across_threads_give_the_same_values(monkeypatch):
    import ml_dtypes

    from reference_impls import _weights

    stored = np.random.default_rng(0).standard_normal((64, 33)).astype(ml_dtypes.bfloat16)
    whole = _weights.Buffers().convert(stored).copy()
    monkeypatch.setattr(_weights, "THREADED_ELEMENTS", 1)
    split = _weights.Buffers().convert(stored)
    np.testing.assert_array_equal(split, whole)
    np.testing.assert_array_equal(whole, stored.astype(np.float64))
