"""The transformers paths as implementations (hf+sdpa, hf+flex, hf+compile) and `bughunt implementations`.

Cost: SDPA runs in-process on every family it supports (seconds each). flex attention and torch.compile compile on
CPU: every family in-process, 144 s for all 16 with an empty Inductor cache on 2 idle cores (later families reuse
kernels). gemma2, the family with an attention soft-cap, also runs in one shared compare with every other installed
implementation (which checks that what `bughunt implementations` lists as installed runs)."""

import json
import os

import pytest

import bughunt
from bughunt.cli import main
from bughunt.implementations import REGISTRY, available
from bughunt.implementations.catalog import describe_all, family_refusal
from bughunt.tiny import TINY_FAMILIES

SDPA_FAMILIES = [f for f in TINY_FAMILIES if f != "gemma2"]
VARIANT_MODULES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3", "llama": "llama", "mistral": "mistral",
                   "phi3": "phi3", "qwen2": "qwen2", "qwen3": "qwen3"}


@pytest.mark.parametrize("family", SDPA_FAMILIES)
def test_sdpa_is_at_the_fp32_floor(tiny, tokens, family):
    result = bughunt.compare(tiny[family], ["hf+sdpa", "reference"], dtype="fp32", tokens=tokens, render=False, isolate=False)
    assert result.data["implementations"][1]["status"] == "ok"
    assert result.first_above_floor("hf+sdpa") is None, result.comparison("hf+sdpa")["summary"]


@pytest.mark.slow
@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("impl", ["hf+flex", "hf+compile"])
def test_flex_and_compile_are_at_the_fp32_floor_on_every_family(tiny, tokens, family, impl):
    result = bughunt.compare(tiny[family], [impl, "reference"], dtype="fp32", tokens=tokens, render=False, isolate=False)
    assert result.first_above_floor(impl) is None, result.comparison(impl)["summary"]


def test_declared_families_are_what_transformers_allows():
    """hf+sdpa lists a family exactly when transformers' model class supports SDPA; hf+flex when it supports flex."""
    import importlib

    from bughunt.implementations.hf_variants import HFFlexRunner, HFSdpaRunner

    for family, module in VARIANT_MODULES.items():
        m = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
        base = next(getattr(m, n) for n in dir(m) if n.endswith("PreTrainedModel") and n.lower().startswith(module))
        assert (family in HFSdpaRunner.families) == base._supports_sdpa, family
        assert (family in HFFlexRunner.families) == base._supports_flex_attn, family
        assert (family in HFSdpaRunner.refusals) == (not base._supports_sdpa), family


def test_sdpa_on_gemma2_is_a_clear_refusal(tiny, capsys):
    code = main(["compare", str(tiny["gemma2"]), "--impl", "hf+sdpa", "--in-process", "--out", "/tmp/never-written-hfv"])
    err = capsys.readouterr().err
    assert code == 2
    assert "hf+sdpa" in err and "Gemma 2" in err and "soft-cap" in err and "Traceback" not in err
    assert not os.path.exists("/tmp/never-written-hfv")


def test_sdpa_refusal_in_a_matrix_is_a_failed_entry_with_its_reason(tiny, tokens):
    result = bughunt.compare(tiny["gemma2"], ["hf", "hf+sdpa", "reference"], dtype="fp32", tokens=tokens, render=False, isolate=False)
    entries = {e["label"]: e for e in result.data["implementations"]}
    assert entries["hf"]["status"] == "ok"
    assert entries["hf+sdpa"]["status"] != "ok" and "soft-cap" in entries["hf+sdpa"]["error"]
    assert "soft-cap" in family_refusal("hf+sdpa", None, "gemma2")
    assert family_refusal("hf+sdpa", None, "llama") is None


def test_planted_softcap_removal_on_sdpa_is_found_at_the_first_layer(tiny, tokens, monkeypatch):
    """The Gemma 2 bug as it was: transformers let Gemma 2 run on SDPA and the soft-cap was dropped. Planted by letting
    Gemma 2 through and wrapping transformers' registered SDPA attention function so it drops `softcap`."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.gemma2.modeling_gemma2 import Gemma2PreTrainedModel

    from bughunt.implementations.hf import HFRunner
    from bughunt.implementations.hf_variants import HFSdpaRunner

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    dropped = []

    def sdpa_dropping_softcap(module, query, key, value, attention_mask, **kwargs):
        dropped.append(kwargs.pop("softcap", None))
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", sdpa_dropping_softcap)
    monkeypatch.setattr(Gemma2PreTrainedModel, "_supports_sdpa", True)
    monkeypatch.setattr(HFSdpaRunner, "refusals", {})
    monkeypatch.setattr(HFSdpaRunner, "families", HFRunner.families)
    result = bughunt.compare(tiny["gemma2"], ["hf+sdpa", "reference"], dtype="fp32", tokens=tokens, render=False, isolate=False)
    assert dropped and dropped[0] == 50.0  # the tiny gemma2's attn_logit_softcapping reached the wrapper and was dropped
    assert result.first_above_floor("hf+sdpa") == "layer.0.attn"


@pytest.fixture(scope="module")
def every_installed(tiny, tokens):
    """One compare on tiny gemma2 with every installed implementation that lists gemma2, at fp32, through workers;
    then hf+compile again in the same worker pool (its compiled model is kept)."""
    from bughunt.worker import WorkerPool

    infos = [i for i in describe_all() if i.installed and i.name != "reference" and "gemma2" in i.families]
    with WorkerPool() as pool:
        first = bughunt.compare(tiny["gemma2"], [i.name for i in infos] + ["reference"], dtype="fp32", tokens=tokens,
                                render=False, pool=pool)
        again = bughunt.compare(tiny["gemma2"], ["hf+compile", "reference"], dtype="fp32", tokens=tokens, render=False, pool=pool)
    return infos, first, again


@pytest.mark.slow
def test_every_implementation_listed_as_installed_runs(every_installed):
    infos, first, _ = every_installed
    assert {"hf", "hf+flex", "hf+compile"} <= {i.name for i in infos}
    entries = {e["label"]: e for e in first.data["implementations"]}
    for info in infos:
        assert entries[info.name]["status"] == "ok", (info.name, entries[info.name]["error"])
        assert "fp32" in info.dtypes and "cpu" in info.devices
        listed = {d.lower().replace("_", "-"): v for d, v in info.versions.items()}
        reported = entries[info.name]["meta"]["versions"]
        assert reported
        for library, version in reported.items():  # what the run reports agrees with what the list says
            assert listed.get(library.lower().replace("_", "-"), version) == version, (info.name, library)


@pytest.mark.slow
def test_flex_and_compile_are_at_the_fp32_floor(every_installed):
    _, first, _ = every_installed
    assert first.first_above_floor("hf+flex") is None, first.comparison("hf+flex")["summary"]
    assert first.first_above_floor("hf+compile") is None, first.comparison("hf+compile")["summary"]
    timings = {e["label"]: e for e in first.data["implementations"]}["hf+compile"]["meta"]["timings"]
    assert timings["graph_breaks"] == 0  # the capture hooks are traced into one graph


@pytest.mark.slow
def test_compile_is_paid_once_per_worker(every_installed):
    _, first, again = every_installed
    meta = {e["label"]: e for e in again.data["implementations"]}["hf+compile"]["meta"]
    before = {e["label"]: e for e in first.data["implementations"]}["hf+compile"]["meta"]
    assert meta["worker"]["reused_loaded_model"] is True
    assert meta["timings"]["forward_s"] < before["timings"]["forward_s"] / 5
    assert again.first_above_floor("hf+compile") is None


def test_implementations_command_lists_the_registry(capsys):
    assert main(["implementations"]) == 0
    text = capsys.readouterr().out
    for name in REGISTRY:
        assert f"\n{name} " in "\n" + text
    assert "refuses gemma2" in text
    assert main(["implementations", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [i["name"] for i in listed] == list(REGISTRY)
    for i in listed:
        assert i["installed"] == available(i["name"])
        assert i["installed"] or i["install"]
    hf = next(i for i in listed if i["name"] == "hf")
    assert "transformers" in hf["versions"] and "gelu" in hf["toggles"] and "norm_dtype" in hf["toggles_refused"]


def test_compare_help_lists_every_implementation(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines at hyphens (keras-\njax)
    listed = text.split("implementationtorun(repeatable):")[1].split(";")[0].split(",")
    assert listed == list(REGISTRY)


@pytest.mark.slow
def test_ci_skips_a_cell_whose_implementation_refuses_the_family(tmp_path):
    from bughunt.ci import run_ci

    matrix = tmp_path / "m.toml"
    matrix.write_text('reference = "reference"\nimplementations = ["hf", "hf+sdpa"]\ndtypes = ["fp32"]\n'
                      '[[checkpoints]]\ntiny = "gemma2"\n')
    run_ci(matrix, tmp_path / "baselines", update_baseline=True, out=tmp_path / "rec", log=lambda s: None)
    assert sorted(p.name for p in (tmp_path / "baselines").iterdir()) == ["gemma2__hf-fp32__cpu.json"]
    run = run_ci(matrix, tmp_path / "baselines", out=tmp_path / "gate", log=lambda s: None)
    status = {o.cell.id: o.status for o in run.outcomes}
    assert status == {"gemma2/hf:fp32/cpu": "pass", "gemma2/hf+sdpa:fp32/cpu": "skipped"}
    assert run.exit_code == 0
    summary = (tmp_path / "gate" / "summary.md").read_text()
    assert "skipped" in summary and "soft-cap" in summary
    assert 'skipped="1"' in (tmp_path / "gate" / "junit.xml").read_text()


def test_readme_lists_every_registered_implementation():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    paragraph = readme.split("The implementations, each in its own worker process")[1].split("\n\n")[0]
    for name in REGISTRY:
        assert f"`{name}`" in paragraph, f"README's implementation list misses {name}"
