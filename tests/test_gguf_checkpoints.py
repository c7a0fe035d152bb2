"""A GGUF file is a checkpoint: its derived view holds exactly gguf-py's dequantized tensors, llama.cpp runs the file
itself at its own type within that type's floor, and `--original` names what a converter did to a tensor."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from bughunt import sources
from bughunt.checkpoint import load_weights
from bughunt.spec import load_spec

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def llama256(tmp_path_factory):
    """A tiny llama whose rows hold whole 256-wide k-quant blocks."""
    from bughunt.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama256"), config_overrides={
        "hidden_size": 256, "intermediate_size": 512, "head_dim": 64, "num_hidden_layers": 2})


@pytest.fixture(scope="module")
def quantized(llama256, tmp_path_factory):
    """type -> a GGUF written by llama.cpp's vendored converter, then quantized by llama.cpp's own quantizer, copied
    where a user would keep it."""
    from bughunt.implementations.llamacpp import gguf_file

    out = tmp_path_factory.mktemp("ggufs")
    files = {}
    for qtype in ("q8_0", "q4_k_m"):
        files[qtype] = out / f"tiny-llama.{qtype}.gguf"
        shutil.copyfile(gguf_file(llama256, qtype)[0], files[qtype])
    return files


@pytest.mark.parametrize("qtype", ["q8_0", "q4_k_m"])
def test_the_view_holds_gguf_pys_dequantized_tensors_under_hf_names(quantized, llama256, qtype):
    from gguf import GGUFReader, dequantize

    from bughunt.implementations.quantized_weights import _unpermute

    view = sources.resolve(quantized[qtype])
    record = sources.describe(view)
    assert record["kind"] == "gguf" and record["file_type"] == qtype and record["file"] == str(quantized[qtype].resolve())
    assert "gguf-py" in record["derived"]["weights"] and record["versions"]["gguf"]
    spec = load_spec(view)
    want = load_spec(llama256).to_dict()
    got = spec.to_dict()
    assert np.float32(got.pop("rms_eps")) == np.float32(want.pop("rms_eps"))  # GGUF metadata holds it as float32
    assert got == want
    weights = load_weights(view, spec)
    reader = GGUFReader(str(quantized[qtype]))
    by_gguf = {"token_embd.weight": "model.embed_tokens.weight", "blk.1.attn_q.weight": "model.layers.1.self_attn.q_proj.weight",
               "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight", "blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj.weight",
               "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight", "output.weight": "lm_head.weight"}
    seen = 0
    for tensor in reader.tensors:
        if tensor.name not in by_gguf:
            continue
        name = by_gguf[tensor.name]
        expected = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(weights[name].shape)
        if "attn_q" in tensor.name or "attn_k" in tensor.name:  # llama.cpp's converter permutes q/k rows for its RoPE
            expected = _unpermute(expected, spec.num_heads if "attn_q" in tensor.name else spec.num_kv_heads)
        assert np.array_equal(np.asarray(weights[name]), expected), name
        seen += 1
    assert seen >= 5
    assert sources.resolve(quantized[qtype]) == view  # cached by content hash: derived once


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["q8_0", "q4_k_m"])
def test_compare_on_a_gguf_runs_llamacpp_on_the_file_itself_within_its_quantization_floor(quantized, tokens, qtype):
    from bughunt.comparison import compare

    result = compare(quantized[qtype], ["llamacpp", "hf", "reference"], dtype="fp32", tokens=tokens, render=False)
    labels = [c["candidate"] for c in result.comparisons]
    assert labels == [f"llamacpp:{qtype}", "hf"]
    llamacpp = result.comparison(f"llamacpp:{qtype}")
    assert llamacpp["first_above_floor"] is None, max(p["ratio_to_floor"] for p in llamacpp["points"])
    assert result.comparison("hf")["first_above_floor"] is None
    meta = next(e for e in result.data["implementations"] if e["label"] == f"llamacpp:{qtype}")["meta"]
    assert meta["conversion"]["file"] == str(quantized[qtype].resolve())  # the user's file itself, not a re-conversion
    assert result.data["checkpoint"]["source"]["kind"] == "gguf"
    assert result.data["command"].startswith(f"bughunt compare {quantized[qtype].resolve()}")
    floor = result.data["noise_floor"][qtype]
    assert floor["points"]["layer.0.attn"]["rel_l2"] > 1e-4  # the activations' quantization, far above fp32 rounding


@pytest.mark.slow
def test_a_planted_bug_on_a_gguf_still_departs(quantized, tokens):
    from bughunt.comparison import compare

    result = compare(quantized["q8_0"], ["llamacpp[rope_theta=100.0]", "reference"], dtype="fp32", tokens=tokens,
                     render=False)
    assert result.comparisons[0]["first_above_floor"] == "layer.0.attn"


def _plant_row_permutation(path, tensor_name, head_dim):
    """Permute the stored rows of one tensor within each head, in place (rows of quantized blocks move whole)."""
    from gguf import GGUFReader

    from bughunt.weightcheck import rope_interleave

    reader = GGUFReader(str(path), "r+")
    tensor = next(t for t in reader.tensors if t.name == tensor_name)
    data = tensor.data.reshape(tensor.data.shape[0], -1)
    data[...] = rope_interleave(np.array(data), head_dim)
    data.flush() if hasattr(data, "flush") else None
    del reader


def test_weights_original_relates_every_tensor_and_names_a_planted_permutation(quantized, llama256, tmp_path):
    from bughunt.gguf_original import relate_arguments

    clean = relate_arguments(quantized["q8_0"], llama256)
    assert clean.departures == [], [(r.name, r.relation, r.detail) for r in clean.departures]
    assert clean.counts.get("quantized", 0) >= 14 and "identical" in clean.counts  # the norms stay f32
    planted = tmp_path / "planted.q8_0.gguf"
    shutil.copyfile(quantized["q8_0"], planted)
    _plant_row_permutation(planted, "blk.1.attn_q.weight", load_spec(llama256).head_dim)
    wc = relate_arguments(planted, llama256)
    bad = {r.name: r for r in wc.departures}
    assert list(bad) == ["model.layers.1.self_attn.q_proj.weight"], [(r.name, r.relation) for r in wc.departures]
    assert bad["model.layers.1.self_attn.q_proj.weight"].relation == "permuted"
    proc = subprocess.run([sys.executable, "-m", "bughunt.cli", "weights", str(planted), "--original", str(llama256),
                           "--json", str(tmp_path / "w.json")], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert "permuted" in proc.stdout and "q_proj" in proc.stdout
    rows = json.loads((tmp_path / "w.json").read_text())["rows"]
    assert sum(r["relation"] == "permuted" for r in rows) == 1


def test_original_needs_a_gguf_checkpoint(llama256):
    proc = subprocess.run([sys.executable, "-m", "bughunt.cli", "weights", str(llama256), "--original", str(llama256)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "not a GGUF file" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_compare_with_original_names_a_planted_permutation_and_runs_hf_on_the_original(quantized, llama256, tokens, tmp_path):
    from bughunt.comparison import compare
    from bughunt.summary import format_summary

    clean = compare(quantized["q8_0"], ["hf", "reference"], dtype="fp32", tokens=tokens, original=str(llama256), render=False)
    section = clean.data["original"]
    assert section["weights"]["rows"] == [] and section["hf"]["first_above_floor"] is None, section["hf"]["points"][:4]
    assert section["hf"]["floor_dtype"] == "q8_0"
    assert not [f for f in clean.data["findings"] if f.get("implementation") in ("original", "hf@original")]
    planted = tmp_path / "planted.q8_0.gguf"
    shutil.copyfile(quantized["q8_0"], planted)
    _plant_row_permutation(planted, "blk.1.attn_q.weight", load_spec(llama256).head_dim)
    result = compare(planted, ["hf", "reference"], dtype="fp32", tokens=tokens, original=str(llama256),
                     out=tmp_path / "report")
    section = result.data["original"]
    assert [(r["name"], r["relation"]) for r in section["weights"]["rows"]] == \
        [("model.layers.1.self_attn.q_proj.weight", "permuted")]
    assert section["hf"]["first_above_floor"] == "layer.1.attn"
    assert result.comparison("hf")["first_above_floor"] is None  # hf and the reference read the same (planted) GGUF
    assert "--original" in result.data["command"]
    text = format_summary(result)
    assert "original" in text and "permuted" in text
    assert "Against the original checkpoint" in (tmp_path / "report" / "report.html").read_text()


@pytest.mark.slow
def test_a_gguf_is_a_checkpoint_for_lint_sweep_decode_and_ci_cells(quantized, tokens, tmp_path):
    from bughunt.ci.matrix import load_matrix
    from bughunt.decode import decode_check
    from bughunt.lint import lint
    from bughunt.sweep import sweep

    gguf = quantized["q8_0"]
    report = lint(gguf)
    assert report.family == "llama" and report.count("error") == 0, [f for f in report.findings if f.severity == "error"]
    swept = sweep(gguf, impl="llamacpp", side="candidate", toggles=["kv_cache=f32"], tokens=tokens, render=False)
    assert swept.data["checkpoint"]["source"]["kind"] == "gguf"
    assert swept.data["command"].split()[2] == str(gguf.resolve()) and "llamacpp:q8_0" in swept.data["command"]
    decoded = decode_check(gguf, impl="hf", tokens=tokens, prefill=4)
    assert decoded.data["checkpoint"]["source"]["file_type"] == "q8_0"
    matrix = tmp_path / "bughunt.toml"
    shutil.copyfile(gguf, tmp_path / "model.gguf")
    matrix.write_text('[[checkpoints]]\npath = "model.gguf"\nimplementations = ["hf"]\ndtypes = ["fp32"]\n')
    entry = load_matrix(matrix).checkpoints[0]
    assert sources.describe(entry.resolve())["kind"] == "gguf"
