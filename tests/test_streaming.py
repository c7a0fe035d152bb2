"""Real sizes: the reference streams its weights, traces stream to disk and are compared from memory-mapped files,
and a run that cannot fit in memory is refused before it starts. Each streamed path must give exactly what the
in-memory path gives."""

import json
import math

import numpy as np
import pytest

import reference_impls
from bughunt import metrics
from bughunt.checkpoint import load_weights, weight_files
from bughunt.implementations.reference import ReferenceRunner
from bughunt.metrics import compare_traces
from bughunt.safetensors_io import SafetensorsWriter, map_safetensors, write_safetensors
from bughunt.spec import load_spec
from bughunt.tiny import TINY_FAMILIES
from bughunt.trace import Trace, TraceWriter
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


def test_a_run_that_cannot_fit_is_refused_before_it_starts(capsys, tiny, tmp_path):
    from badinput import assert_refused

    out = tmp_path / "out"
    err = assert_refused(capsys, ["compare", str(tiny["llama"]), "--impl", "hf", "--impl", "reference", "--max-memory", "100M",
                                  "--out", str(out)], r"cannot fit in 0\.1 GB \(--max-memory\).*needs about .* GB.*Try",
                         watch=[out, tiny["llama"]])
    assert "--device-map auto" in err


def test_max_memory_must_be_a_size(capsys, tiny, tmp_path):
    from badinput import assert_refused

    assert_refused(capsys, ["compare", str(tiny["llama"]), "--max-memory", "lots", "--out", str(tmp_path / "o")],
                   r"--max-memory 'lots' is not a size", watch=[tmp_path])


@pytest.mark.slow
def test_compare_schedules_one_after_another_when_only_each_alone_fits(tiny, tokens):
    from bughunt import memory
    from bughunt.comparison import compare

    spec = load_spec(tiny["llama"])
    hf = memory.estimate("hf", "hf", spec, "fp32", tokens.shape)
    ref = memory.estimate("reference", "reference", spec, "fp64", tokens.shape)
    budget = max(hf.peak_bytes, ref.peak_bytes) + int(memory.PARENT_GB * memory.GB) + 1  # each alone fits, not both
    result = compare(tiny["llama"], ["hf", "reference"], tokens=tokens, max_memory=budget)
    schedule = result.data["schedule"]
    assert schedule["side_by_side"] is False and schedule["budget_source"] == "--max-memory"
    assert sorted(schedule["order"]) == ["hf", "reference"]
    assert result.comparison("hf")["first_above_floor"] is None  # and the comparison itself is unchanged
    roomy = compare(tiny["llama"], ["hf", "reference"], tokens=tokens, max_memory=100 * memory.GB)
    assert roomy.data["schedule"]["side_by_side"] is True
    assert roomy.metric("hf", "logits") == result.metric("hf", "logits")


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


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_passes_run_side_by_side_equal_the_same_passes_run_alone(family, tiny, tokens, tmp_path):
    """forward_many shares each layer's converted weights between passes; nothing else may change."""
    from bughunt.implementations.reference import run_together

    spec = load_spec(tiny[family])
    settings = [("fp64", {}), ("bf16", {}), ("fp16", {}), ("bf16", {"gelu": "exact"} if family == "gemma2" else {"rope_theta": "5000"})]
    runners = [ReferenceRunner(tiny[family], spec, d, toggles=t, label=f"{d}{t}") for d, t in settings]
    for r in runners:
        r.open()
    together = run_together(runners, tokens, [tmp_path / f"t{i}" for i in range(len(runners))])
    for r, trace in zip(runners, together):
        alone = r.run(tokens)
        assert trace.meta["timings"]["together_with"] == len(runners)
        for p in alone.points():
            np.testing.assert_array_equal(trace.arrays[p], alone.arrays[p], err_msg=f"{r.label} {p}")
        r.close()
    assert not np.array_equal(together[0].arrays["logits"], together[1].arrays["logits"])  # the passes really differ


@pytest.mark.slow
def test_a_candidate_side_sweep_switches_live_toggles_on_the_loaded_model(tiny, tokens):
    """Module swaps (gelu, query scale, RoPE wrappers) need no reload; config values do. Either way the trace is
    exactly what a fresh load with the same toggles gives."""
    from bughunt.execute import run_trace
    from bughunt.implementations import ImplChoice
    from bughunt.jobs import Load, TraceJob
    from bughunt.worker import WorkerPool

    ck, spec = tiny["gemma"], load_spec(tiny["gemma"])
    import tempfile
    from pathlib import Path

    scratch = Path(tempfile.mkdtemp())
    with WorkerPool() as pool:
        run = lambda tg, i: run_trace(Load(ImplChoice("hf"), ck, spec, "fp32", toggles=tg), TraceJob(tokens, scratch / f"t{i}"), pool)  # noqa: E731
        first = run({}, 0)
        live = run({"gelu": "exact"}, 1)
        back = run({}, 2)
        config = run({"gelu": "exact", "rms_eps": "0.001"}, 3)
    assert first.meta["worker"]["reused_loaded_model"] is False
    assert live.meta["worker"]["reused_loaded_model"] is True
    assert config.meta["worker"]["reused_loaded_model"] is False  # rms_eps is read when the model is built
    assert back.meta["worker"]["reused_loaded_model"] is True
    from bughunt.implementations.hf import HFRunner

    with HFRunner(ck, spec, "fp32", toggles={"gelu": "exact"}) as fresh:
        expected = fresh.run(tokens)
    for p in expected.points():
        np.testing.assert_array_equal(live.arrays[p], expected.arrays[p], err_msg=p)
        np.testing.assert_array_equal(back.arrays[p], first.arrays[p], err_msg=p)  # undone exactly
    assert not np.array_equal(live.arrays["logits"], first.arrays["logits"])


def test_the_documented_api_call_survives_importing_the_experiment_modules(tiny):
    import bughunt
    import bughunt.comparison  # noqa: F401 - the module has its own name; bughunt.compare stays the function

    result = bughunt.compare(tiny["llama"], ["reference:fp32", "reference"], tokens=[[2, 5, 7]], render=False)
    assert result.first_above_floor("reference:fp32") is None


@pytest.mark.slow
def test_device_map_auto_captures_every_layer_like_a_plain_load(tiny, tokens):
    from bughunt.comparison import compare

    plain = compare(tiny["qwen3"], ["hf", "reference"], tokens=tokens, render=False)
    mapped = compare(tiny["qwen3"], ["hf", "reference"], tokens=tokens, render=False, device_map="auto")
    points = [p["point"] for p in plain.comparison("hf")["points"]]
    assert points == [p["point"] for p in mapped.comparison("hf")["points"]] and len(points) > 5
    for p in points:
        assert mapped.metric("hf", p) == plain.metric("hf", p), p


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_screening_pass_stops_after_its_layers_and_equals_the_full_pass_there(family, tiny, tokens, tmp_path):
    """The search's screening passes (run_together(layers=L)) hold the embedding and L decoder layers, bit for bit."""
    from bughunt.implementations.reference import run_together

    spec = load_spec(tiny[family])
    runners = [ReferenceRunner(tiny[family], spec, d) for d in ("fp64", "bf16")]
    for r in runners:
        r.open()
    short = run_together(runners, tokens, [tmp_path / "a", tmp_path / "b"], layers=1)
    for r, trace in zip(runners, short):
        full = r.run(tokens)
        assert set(trace.points()) == {p for p in full.points() if p == "embed" or p.startswith("layer.0")}
        for p in trace.points():
            np.testing.assert_array_equal(trace.arrays[p], full.arrays[p], err_msg=p)
        r.close()


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


def test_a_compute_bound_run_on_few_cores_runs_one_after_another(tiny, tokens):
    from bughunt import memory

    spec = load_spec(tiny["llama"])
    estimates = [memory.estimate(n, n, spec, "bf16", tokens.shape) for n in ("hf", "reference")]
    heavy = memory.plan(estimates, 100 * memory.GB, flops=10 * memory.LIGHT_FLOPS, ncores=2)
    assert heavy.side_by_side is False and "compute-bound" in heavy.reason and "2 cores" in memory.describe(heavy)
    assert memory.plan(estimates, 100 * memory.GB, flops=10 * memory.LIGHT_FLOPS, ncores=4).side_by_side is True
    assert memory.plan(estimates, 100 * memory.GB, flops=memory.forward_flops(spec, tokens.size), ncores=2).side_by_side is True
