"""The memory plan: a run that cannot fit in memory is refused before it starts; implementations run one after
another when only each alone fits or when the run is compute-bound on few cores; `--device-map auto` captures every
layer as a plain load does."""

import pytest

from bughunt.spec import load_spec


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


def test_a_compute_bound_run_on_few_cores_runs_one_after_another(tiny, tokens):
    from bughunt import memory

    spec = load_spec(tiny["llama"])
    estimates = [memory.estimate(n, n, spec, "bf16", tokens.shape) for n in ("hf", "reference")]
    heavy = memory.plan(estimates, 100 * memory.GB, flops=10 * memory.LIGHT_FLOPS, ncores=2)
    assert heavy.side_by_side is False and "compute-bound" in heavy.reason and "2 cores" in memory.describe(heavy)
    assert memory.plan(estimates, 100 * memory.GB, flops=10 * memory.LIGHT_FLOPS, ncores=4).side_by_side is True
    assert memory.plan(estimates, 100 * memory.GB, flops=memory.forward_flops(spec, tokens.size), ncores=2).side_by_side is True


@pytest.mark.slow
def test_device_map_auto_captures_every_layer_like_a_plain_load(tiny, tokens):
    from bughunt.comparison import compare

    plain = compare(tiny["qwen3"], ["hf", "reference"], tokens=tokens, render=False)
    mapped = compare(tiny["qwen3"], ["hf", "reference"], tokens=tokens, render=False, device_map="auto")
    points = [p["point"] for p in plain.comparison("hf")["points"]]
    assert points == [p["point"] for p in mapped.comparison("hf")["points"]] and len(points) > 5
    for p in points:
        assert mapped.metric("hf", p) == plain.metric("hf", p), p
