"""The scale benchmark's pieces (benchmarks/): real-shaped configs, the streaming checkpoint writer, and the
process-tree measurement with its memory guard. Checkpoints here are micro-sized; no test allocates more than
a few hundred MB. The benchmark's figures themselves are never asserted."""

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from benchmarks import scale
from benchmarks.proctree import measure
from benchmarks.shapes import (MARKER, SHAPES, Shape, checkpoint_dir, ensure_checkpoint, expected_shapes, forward_flops,
                               matmul_parameters, parameter_count, tensor_chunks)
from bughunt.checkpoint import validate_weights
from bughunt.errors import BughuntError
from bughunt.safetensors_io import read_safetensors
from bughunt.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def micro(family: str = "llama", **over) -> Shape:
    """A real-format config at toy size (hidden 64, 3 layers), untied so the lm_head is written too."""
    if family == "gemma":
        config = {**SHAPES["gemma-2b"].config, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                  "num_key_value_heads": 1, "head_dim": 32, "intermediate_size": 128, "vocab_size": 512}
    else:
        config = {**SHAPES["llama-1b"].config, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": 512,
                  "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    return Shape(f"micro-{family}", "toy size", {**config, **over})


def digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("*.safetensors"))}


# -- shapes --------------------------------------------------------------------------------------------------
def test_shapes_have_the_published_parameter_counts():
    counts = {name: parameter_count(s.spec) for name, s in SHAPES.items()}
    assert counts["llama-1b"] == 1_235_814_400  # Llama 3.2 1B
    assert counts["gemma-2b"] == 2_506_172_416  # Gemma 1 2B
    assert counts["llama-8b"] == 8_030_261_248  # Llama 3 8B
    assert 50e6 <= counts["small"] <= 100e6


@pytest.mark.parametrize("name", list(SHAPES))
def test_matmul_flops_count_every_projection_and_the_lm_head_but_not_the_embedding(name):
    spec = SHAPES[name].spec
    norms = sum(int(np.prod(s)) for n, s in expected_shapes(spec).items() if n.endswith("norm.weight"))
    embedding = 0 if spec.tie_word_embeddings else spec.vocab_size * spec.hidden_size  # tied: counted as the lm_head
    assert matmul_parameters(spec) == parameter_count(spec) - norms - embedding
    flops = forward_flops(spec, batch=2, seq=64)
    assert flops["weights"] == 2 * 2 * 64 * matmul_parameters(spec)
    assert flops["attention"] == 4 * 2 * spec.num_heads * 64**2 * spec.head_dim * spec.num_layers


@pytest.mark.parametrize("name", list(SHAPES))
def test_shape_configs_load_in_transformers_as_the_spec_reads_them(name, tmp_path):
    import transformers

    (tmp_path / "config.json").write_text(json.dumps(SHAPES[name].config))
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    spec = SHAPES[name].spec
    assert (config.num_hidden_layers, config.num_key_value_heads, config.vocab_size) == (spec.num_layers, spec.num_kv_heads, spec.vocab_size)
    assert config.tie_word_embeddings == spec.tie_word_embeddings
    assert config.rope_parameters["rope_theta"] == spec.rope["full"].theta
    assert config.rope_parameters["rope_type"] == spec.rope["full"].type


# -- writer --------------------------------------------------------------------------------------------------
def test_written_checkpoint_is_sharded_valid_and_loads_in_transformers(tmp_path):
    import torch
    import transformers

    shape = micro()
    info = ensure_checkpoint(shape, tmp_path, shard_bytes=60_000)
    assert info.status == "written" and info.shards > 2
    index = json.loads((info.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected_shapes(shape.spec))
    tensors = {}
    for f in sorted(set(index["weight_map"].values())):
        shard = read_safetensors(info.path / f)
        assert sum(a.nbytes for a in shard.values()) <= 60_000 or len(shard) == 1  # a bigger tensor alone
        tensors.update(shard)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values()) == info.bytes
    validate_weights(info.path, load_spec(info.path))
    assert json.loads((info.path / "config.json").read_text()) == shape.config
    # Scales as bughunt/tiny.py chooses them: embeddings ~ N(0, 1), linear ~ N(0, 1/fan_in), norms around 1.
    f32 = {k: v.astype(np.float32) for k, v in tensors.items()}
    assert abs(f32["model.embed_tokens.weight"].std() - 1.0) < 0.05
    assert abs(f32["model.layers.0.mlp.down_proj.weight"].std() * np.sqrt(128) - 1.0) < 0.05
    assert abs(f32["lm_head.weight"].std() * np.sqrt(64) - 1.0) < 0.05
    assert abs(f32["model.norm.weight"].mean() - 1.0) < 0.15
    model = transformers.AutoModelForCausalLM.from_pretrained(info.path, dtype=torch.bfloat16, attn_implementation="eager")
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 300, 7]])).logits
    assert torch.isfinite(logits).all()


def test_gemma_weights_use_the_one_plus_w_norm_and_a_small_embedding(tmp_path):
    info = ensure_checkpoint(micro("gemma"), tmp_path)
    tensors = {}
    for f in info.path.glob("*.safetensors"):
        tensors.update({k: v.astype(np.float32) for k, v in read_safetensors(f).items()})
    assert abs(tensors["model.norm.weight"].mean()) < 0.15  # stored w of a (1 + w) scale
    assert abs(tensors["model.embed_tokens.weight"].std() * np.sqrt(64) - 1.0) < 0.05  # times sqrt(hidden) at run time
    assert "lm_head.weight" not in tensors


def test_rerun_reuses_the_checkpoint_and_a_fresh_write_gives_the_same_bytes(tmp_path):
    shape = micro()
    first = ensure_checkpoint(shape, tmp_path / "a", shard_bytes=60_000)
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()}
    again = ensure_checkpoint(shape, tmp_path / "a", shard_bytes=60_000)
    assert again.status == "reused" and again.bytes == first.bytes and again.shards == first.shards
    assert {p.name: p.stat().st_mtime_ns for p in again.path.iterdir()} == mtimes
    other = ensure_checkpoint(shape, tmp_path / "b", shard_bytes=60_000)
    assert digest(other.path) == digest(first.path)
    assert digest(ensure_checkpoint(shape, tmp_path / "c", seed=1).path) != digest(first.path)


def test_a_damaged_or_stale_copy_of_our_own_is_rewritten(tmp_path):
    shape = micro()
    info = ensure_checkpoint(shape, tmp_path)
    shard = next(info.path.glob("*.safetensors"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 10)  # a shard cut short
    assert ensure_checkpoint(shape, tmp_path).status == "written"
    validate_weights(info.path, load_spec(info.path))
    changed = Shape(shape.name, shape.description, {**shape.config, "rms_norm_eps": 1e-6})  # same name, new config
    assert ensure_checkpoint(changed, tmp_path).status == "written"
    assert json.loads((info.path / "config.json").read_text())["rms_norm_eps"] == 1e-6


def test_a_directory_the_writer_did_not_make_is_refused_and_left_alone(tmp_path):
    shape = micro()
    target = checkpoint_dir(shape, tmp_path, 0)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    with pytest.raises(BughuntError, match=f"not written by benchmarks/shapes.py.*no {MARKER}"):
        ensure_checkpoint(shape, tmp_path)
    assert [p.name for p in target.iterdir()] == ["config.json"] and (target / "config.json").read_text() == "{}"


def test_partial_copies_never_look_complete_and_dead_writers_partials_are_removed(tmp_path):
    shape = micro()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    final = checkpoint_dir(shape, tmp_path, 0)
    partial = tmp_path / f".{final.name}.partial-{int(dead.stdout)}"
    partial.mkdir()
    (partial / "config.json").write_text(json.dumps(shape.config))
    assert not final.exists()
    ensure_checkpoint(shape, tmp_path)
    assert not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]  # nothing hidden left behind


def test_weights_are_drawn_in_bounded_chunks():
    spec = micro().spec
    chunks = list(tensor_chunks("model.layers.0.mlp.up_proj.weight", (128, 64), spec, 0, chunk_elements=1000))
    assert len(chunks) == 128 // (1000 // 64) + 1
    assert max(len(c) for c in chunks) <= 1000 * 2 and sum(len(c) for c in chunks) == 128 * 64 * 2


# -- process-tree measurement --------------------------------------------------------------------------------
def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


TREE = """
import subprocess, sys, time
held = b"x" * {parent}
child = subprocess.Popen([sys.executable, "-c", "import os, time; open({pidfile!r}, 'w').write(str(os.getpid())); held = b'y' * {child}; time.sleep({sleep})"])
time.sleep({sleep})
child.wait()
"""


def test_peak_rss_is_summed_over_the_whole_process_tree(tmp_path):
    code = TREE.format(parent=100_000_000, child=150_000_000, pidfile=str(tmp_path / "pid"), sleep=1.5)
    m = measure([sys.executable, "-c", code])
    assert m.status == "ok" and m.exit_code == 0
    assert m.peak_processes >= 2
    assert m.peak_rss_bytes > 250e6 and m.peak_anon_bytes > 250e6  # parent and child together
    assert m.wall_s >= 1.5


def test_the_guard_kills_the_whole_tree_above_its_limit(tmp_path):
    code = TREE.format(parent=10, child=300_000_000, pidfile=str(tmp_path / "pid"), sleep=30)
    m = measure([sys.executable, "-c", code], max_rss_gb=0.2)
    assert m.status == "exceeded" and m.message.startswith("exceeded 0.2 GB")
    assert m.wall_s < 20
    grandchild = int((tmp_path / "pid").read_text())
    deadline = time.monotonic() + 5  # SIGKILL lands asynchronously: give the kernel a moment
    while running(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(grandchild)


@pytest.mark.parametrize("code, status, words", [
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "killed", "SIGKILL"),
    ("import sys; sys.exit(3)", "failed", "exit 3"),
])
def test_exit_and_kill_are_reported_not_raised(code, status, words):
    m = measure([sys.executable, "-c", code])
    assert m.status == status and words in m.message


def test_a_command_past_its_timeout_is_killed():
    m = measure([sys.executable, "-c", "import time; time.sleep(30)"], timeout_s=0.5)
    assert m.status == "timeout" and m.wall_s < 10


# -- the script ----------------------------------------------------------------------------------------------
def test_planted_bug_changes_each_family():
    assert scale.planted_bug(SHAPES["llama-1b"].spec) == "rope_theta=10000"
    assert scale.planted_bug(SHAPES["gemma-2b"].spec) == "gelu=exact"  # its theta is already 10000


def test_reference_rates_are_read_from_a_real_compare_result(tokens):
    from bughunt.comparison import compare
    from bughunt.tiny import tiny_checkpoint

    checkpoint = tiny_checkpoint("llama")
    result = compare(checkpoint, ["reference:bf16", "reference"], dtype="bf16", tokens=tokens, render=False)
    spec = load_spec(checkpoint)
    rates = scale.reference_rates(result.data, spec, 1, tokens.shape[1], gemm=50.0)
    flops = forward_flops(spec, 1, tokens.shape[1])["total"]
    timings = next(e for e in result.data["implementations"] if e["label"] == "reference")["meta"]["timings"]
    assert rates["fp64"]["forward_s"] == timings["forward_s"]
    assert rates["fp64"]["gflops"] == pytest.approx(flops / timings["forward_s"] / 1e9)
    assert rates["fp64"]["fraction_of_gemm"] == pytest.approx(rates["fp64"]["gflops"] / 50.0)
    emulated_s = result.data["noise_floor"]["bf16"]["timings"]["emulated_forward_s"]
    assert rates["emulated"]["gflops"] == pytest.approx(flops / emulated_s / 1e9)
    assert timings["together_with"] == 2  # the float64 and emulated passes ran side by side
    assert rates["together"]["passes"] == 2 and rates["together"]["seconds"] == timings["together_s"]
    assert rates["together"]["gflops"] == pytest.approx(flops * 2 / timings["together_s"] / 1e9)
    assert timings["forward_s"] + emulated_s <= timings["together_s"] * 1.0001  # each pass's own steps


@pytest.mark.slow
def test_bare_forward_is_measured_as_a_process_tree(tmp_path):
    info = ensure_checkpoint(micro(), tmp_path)
    args = scale.build_parser().parse_args(["--max-rss-gb", "4"])
    bare = scale.measure_bare(info.path, "1,5,9,300", args)
    assert bare["status"] == "ok", bare.get("stderr_tail")
    assert bare["inside"]["logits_finite"] and bare["inside"]["tokens"] == 4
    assert bare["peak_rss_bytes"] > 100e6  # torch alone is bigger than that


@pytest.mark.slow
def test_script_writes_then_reuses_and_records_figures(tmp_path, capsys):
    out = tmp_path / "figures.json"
    assert scale.main(["--shape", "small", "--only", "write", "--dir", str(tmp_path / "ck"), "--json", str(out)]) == 0
    assert scale.main(["--shape", "small", "--only", "write", "--dir", str(tmp_path / "ck"), "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["shapes"]["small"]["write"]["status"] == "reused"
    assert figures["machine"]["gemm_fp64_gflops"] > 0
    assert "small  checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--dir", str(ROOT / "ck")], "inside the repository"),
    (["--tokens", "0"], "--tokens must be at least 1"),
    (["--dir", "{tmp}/file"], "is a file"),
    (["--json", "{tmp}/missing/figures.json"], "does not exist"),
    (["--planted-bug", "gelu=fast"], "gelu"),
])
def test_script_bad_input_exits_2_with_one_message(argv, words, capsys, tmp_path):
    (tmp_path / "file").write_text("")
    assert scale.main([a.format(tmp=tmp_path) for a in argv] + ["--only", "write"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not (ROOT / "ck").exists()
