"""`bughunt compare` end to end, from the command line and from Python (`bughunt.compare`), bad input giving exit code
2 with a message and no output left behind, and `bughunt demo`."""

import json
import shutil

import pytest
import torch

from bughunt.cli import main
from bughunt.comparison import compare
from bughunt.result import Result
from bughunt.tiny import make_tiny_checkpoint


def test_compare_writes_a_valid_result_plots_and_report(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    code = main(["compare", str(tiny["gemma2"]), "--impl", "hf", "--impl", "reference", "--reference", "reference",
                 "--dtype", "bf16", "--tokens", "2,17,99,5,200,31,7,8", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "first above floor" in printed and "hf" in printed
    result = Result.load(out)
    result.validate()
    assert result.data["settings"]["dtype"] == "bf16"
    assert result.data["inputs"]["tokens"] == [[2, 17, 99, 5, 200, 31, 7, 8]]
    assert result.first_above_floor("hf") is None  # HF bf16 is within the bf16 noise floor
    assert (out / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (out / "layers.svg").read_text()
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "per-layer log10 L2 plot" in html
    assert result.data["command"] in html.replace("&#39;", "'").replace("&#34;", '"')
    assert "transformers" in html
    assert (out / "traces" / "hf.safetensors").exists() and (out / "traces" / "reference.safetensors").exists()


@pytest.mark.slow
def test_reproduce_command_in_the_result_reruns_to_the_same_numbers(tmp_path, tiny):
    first = compare(tiny["llama"], ["hf", "reference"], dtype="fp32", tokens=[[2, 5, 9, 11]], out=tmp_path / "a")
    argv = __import__("shlex").split(first.data["command"])[1:] + ["--out", str(tmp_path / "b")]
    assert main(argv) == 0
    second = Result.load(tmp_path / "b")
    assert [p["rel_l2"] for p in first.comparison("hf")["points"]] == [p["rel_l2"] for p in second.comparison("hf")["points"]]


def test_a_config_field_hf_reads_differently_is_named_at_the_first_point_it_touches(tiny, tokens):
    # HF runs with rms_norm_eps=0.5 while the reference reads the checkpoint's 1e-6: embed is untouched, the first
    # consumer of a norm (layer.0's attention branch) is where the divergence must first rise above the floor.
    from bughunt.execute import run_implementation
    from bughunt.floors import noise_floor
    from bughunt.judging import judge
    from bughunt.implementations import ImplChoice
    from bughunt.metrics import compare_traces
    from bughunt.spec import load_spec

    ck = tiny["llama"]
    spec = load_spec(ck)
    ref = run_implementation(ImplChoice("reference", "fp64"), ck, spec, "fp64", "cpu", tokens)
    floor = noise_floor(ck, spec, "fp32", tokens, fp64=ref)
    clean = run_implementation(ImplChoice("hf"), ck, spec, "fp32", "cpu", tokens)
    buggy = run_implementation(ImplChoice("hf"), ck, spec, "fp32", "cpu", tokens, config_overrides={"rms_norm_eps": 0.5})
    _, first_clean = judge(compare_traces(clean, ref), floor, 10.0)
    points, first_buggy = judge(compare_traces(buggy, ref), floor, 10.0)
    assert first_clean is None
    assert first_buggy == "layer.0.attn"
    assert points[0]["point"] == "embed" and not points[0]["above_floor"]


@pytest.mark.parametrize("argv_tail, message", [
    (["--dtype", "bf17"], "invalid choice"),
    (["--impl", "nonsense"], "unknown implementation 'nonsense'"),
    (["--tokens", "1,x,3"], "comma-separated integers"),
    (["--tokens", "1,2,9999"], "token ids must lie in [0, 256)"),
    (["--tokens", "1,2", "--tokens-file", "f"], "either --tokens or --tokens-file"),
    (["--tokens-file", "/nonexistent/tokens.txt"], "does not exist"),
    (["--impl", "hf", "--impl", "hf"], "named twice"),
    (["--floor-factor", "0"], "must be positive"),
])
def test_bad_flags_exit_2_with_a_message_and_write_nothing(argv_tail, message, tmp_path, tiny, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) if "invalid choice" in message else _nullcontext() as exc:
        code = main(["compare", str(tiny["llama"]), "--out", str(out)] + argv_tail)
    err = capsys.readouterr().err
    if exc is not None and hasattr(exc, "value"):
        code = exc.value.code
    assert code == 2
    assert message in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("mutate, message", [
    (lambda ck: (ck / "config.json").write_text("{broken"), "not valid JSON"),
    (lambda ck: (ck / "model.safetensors").unlink(), "has no weights"),
    (lambda ck: (ck / "config.json").write_text(json.dumps({**json.loads((ck / "config.json").read_text()), "num_attention_heads": 3})),
     "not a multiple"),
    (lambda ck: (ck / "config.json").write_text(json.dumps({**json.loads((ck / "config.json").read_text()), "hidden_size": 64})),
     "do not match config.json"),
    (lambda ck: (ck / "config.json").write_text(json.dumps({**json.loads((ck / "config.json").read_text()), "model_type": "gpt2"})),
     "not supported"),
    (lambda ck: (ck / "model.safetensors").rename(ck / "pytorch_model.bin"), "--allow-pickle"),
])
def test_bad_checkpoints_exit_2_from_the_cli(mutate, message, tmp_path, tiny, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(tiny["llama"], ck)
    mutate(ck)
    out = tmp_path / "out"
    assert main(["compare", str(ck), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_nan_in_a_trace_is_a_finding_not_a_crash(tmp_path):
    # fp16 overflows where fp32 does not: scale one layer's up projection so the MLP output exceeds 65504.
    ck = make_tiny_checkpoint("llama", tmp_path / "ck")
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(ck)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(3e4)
    model.save_pretrained(ck)
    result = compare(ck, ["hf", "reference"], dtype="fp16", out=tmp_path / "out")
    result.validate()
    nonfinite = [f for f in result.findings if f["kind"] == "nonfinite"]
    assert len(nonfinite) == 1 and nonfinite[0]["implementation"] == "hf"
    assert nonfinite[0]["point"].startswith("layer.1")
    assert result.first_above_floor("hf") == nonfinite[0]["point"]
    assert "NaN/Inf" in (tmp_path / "out" / "report.html").read_text()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def test_the_documented_api_call_survives_importing_the_experiment_modules(tiny):
    import bughunt
    import bughunt.comparison  # noqa: F401 - the module has its own name; bughunt.compare stays the function

    result = bughunt.compare(tiny["llama"], ["reference:fp32", "reference"], tokens=[[2, 5, 7]], render=False)
    assert result.first_above_floor("reference:fp32") is None


@pytest.mark.slow
def test_demo_writes_reports_for_the_families_and_the_planted_bug(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--family", "llama", "--family", "gemma2"]) == 0
    printed = capsys.readouterr().out
    assert "behaves like the reference with {gelu=exact}" in printed
    for sub in ("llama", "gemma2", "planted-gemma2-gelu"):
        Result.load(out / sub).validate()
        assert (out / sub / "report.html").exists()
    assert "planted-gemma2-gelu" in (out / "index.html").read_text()
