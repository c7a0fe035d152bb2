"""Traces stream to disk point by point (safetensors, read back memory-mapped) and are compared block by block of
positions: the same trace and the same metrics as in memory, and a NaN in a late block is still counted."""

import json
import math

import numpy as np

from bughunt import metrics
from bughunt.implementations.reference import ReferenceRunner
from bughunt.metrics import compare_traces
from bughunt.safetensors_io import SafetensorsWriter, map_safetensors
from bughunt.spec import load_spec
from bughunt.trace import Trace, TraceWriter


def naive_metrics(cand, ref):
    """The metrics computed the plain way, whole arrays at once (what compare did before traces streamed)."""
    c, r = cand.astype(np.float64), ref.astype(np.float64)
    d = c - r
    l2, rn = float(np.sqrt((d * d).sum())), float(np.sqrt((r * r).sum()))
    per = np.sqrt((np.moveaxis(d, 1, 0).reshape(d.shape[1], -1) ** 2).sum(-1))
    return {"l2": l2, "rel_l2": l2 / rn, "max_abs": float(np.abs(d).max()), "per_position_l2": per}


def test_traces_round_trip_through_streaming_and_compare_as_in_memory(tiny, tokens, tmp_path, monkeypatch):
    spec = load_spec(tiny["gemma"])
    with ReferenceRunner(tiny["gemma"], spec, "fp64") as runner:
        ref_mem = runner.run(tokens)
        ref_disk = runner.run(tokens, stem=tmp_path / "fp64")
    with ReferenceRunner(tiny["gemma"], spec, "bf16") as runner:
        cand_mem = runner.run(tokens)
        cand_disk = runner.run(tokens, stem=tmp_path / "bf16")
    again = Trace.load(tmp_path / "bf16")
    assert again.implementation == cand_mem.implementation and again.meta["dtype"] == "bf16"
    for p in cand_mem.points():
        np.testing.assert_array_equal(again.arrays[p], cand_mem.arrays[p])
    monkeypatch.setattr(metrics, "CHUNK_BYTES", 4096)  # several blocks of positions per point
    from_disk, from_memory = compare_traces(cand_disk, ref_disk), compare_traces(cand_mem, ref_mem)
    assert json.dumps(from_disk) == json.dumps(from_memory)
    for m in from_disk:
        naive = naive_metrics(cand_mem.arrays[m["point"]], ref_mem.arrays[m["point"]])
        assert math.isclose(m["l2"], naive["l2"], rel_tol=1e-12)
        assert math.isclose(m["rel_l2"], naive["rel_l2"], rel_tol=1e-12)
        assert m["max_abs"] == naive["max_abs"]
        np.testing.assert_allclose([10 ** v for v in m["per_position"]["log10_l2"]], naive["per_position_l2"], rtol=1e-12)
    logits = from_disk[-1]
    assert logits["point"] == "logits" and 0 < logits["kl"] and logits["top1"] <= 1


def test_nan_in_a_late_block_is_counted_and_poisons_max_abs(monkeypatch):
    monkeypatch.setattr(metrics, "CHUNK_BYTES", 64)
    ref = np.ones((1, 8, 4))
    cand = ref.copy()
    cand[0, 7, 1] = np.nan
    m = metrics.compare_arrays(cand, ref, "layer.0")
    assert m["nonfinite"] == 1 and m["max_abs"] is None and m["l2"] is None
    assert m["per_position"]["max_abs"][:7] == [0.0] * 7 and m["per_position"]["max_abs"][7] is None


def test_writer_streams_tensors_and_outgrows_its_header_reservation(tmp_path):
    import safetensors.numpy

    arrays = {f"layer.{i}": np.full((1, 3, 5), i, dtype=np.float32) for i in range(40)}
    writer = SafetensorsWriter(tmp_path / "t.safetensors", expected_tensors=1)  # far too small: forces the copy path
    for k, v in arrays.items():
        writer.add(k, v)
    big = writer.writable("logits", (1, 3, 7), np.float32)
    big[:, :, :4], big[:, :, 4:] = 1.5, -2.0  # filled piece by piece, as the reference fills logits
    big.flush()
    writer.close({"kind": "test"})
    assert not (tmp_path / "t.safetensors.tmp").exists()
    for read in (map_safetensors(tmp_path / "t.safetensors"), safetensors.numpy.load_file(tmp_path / "t.safetensors")):
        for k, v in arrays.items():
            np.testing.assert_array_equal(read[k], v)
        np.testing.assert_array_equal(read["logits"][0, 0], [1.5] * 4 + [-2.0] * 3)


def test_trace_writer_in_memory_and_on_disk_give_the_same_trace(tmp_path):
    mem, disk = TraceWriter(), TraceWriter(tmp_path / "x", expected_points=2, keep=lambda p: not p.endswith(".attn"))
    for w in (mem, disk):
        w["embed"] = np.arange(6.0).reshape(1, 2, 3)
        w["layer.0.attn"] = np.ones((1, 2, 3))
        buf = w.buffer("logits", (1, 2, 4))
        buf[...] = 7.0
        w["logits"] = buf
    a, b = mem.finish("x", {"dtype": "fp32"}), disk.finish("x", {"dtype": "fp32"})
    assert "layer.0.attn" in a.arrays and "layer.0.attn" not in b.arrays  # the filter drops unwanted branches
    for p in ("embed", "logits"):
        np.testing.assert_array_equal(a.arrays[p], b.arrays[p])
        assert b.arrays[p].dtype == np.float32
