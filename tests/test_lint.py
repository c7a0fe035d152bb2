"""bughunt lint: every check fires on a tiny checkpoint planted with its defect and stays silent on a clean one;
the CLI exit codes and the JSON/HTML outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import per_family

from bughunt.cli import main
from bughunt.lint import CHECKS, RULES, extra_section, format_table, html_section, lint
from bughunt.safetensors_io import read_header, read_safetensors, write_safetensors
from bughunt.tiny import make_tiny_checkpoint
from bughunt.tiny_tokenizer import GEMMA_CHAT_TEMPLATE

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="session")
def clean_dirs(tmp_path_factory):
    """One clean tiny checkpoint (weights and tokenizer, as make_tiny_checkpoint writes them) per family, built on first use."""
    return per_family(tmp_path_factory.mktemp("clean"), lambda family, out: make_tiny_checkpoint(family, out, seed=0))


@pytest.fixture(scope="session")
def clean_lint(clean_dirs):
    cache: dict[tuple[str, bool], object] = {}

    def get(family: str, tokenizers: bool = False):
        if (family, tokenizers) not in cache:
            cache[(family, tokenizers)] = lint(clean_dirs(family), tokenizers=tokenizers)
        return cache[(family, tokenizers)]

    return get


# ---- planting helpers -----------------------------------------------------------------------------


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False))


def config(**fields):
    return lambda d: edit_json(d / "config.json", lambda c: c.update(fields))


def rope(params: dict):
    return config(rope_parameters=params)


def tok_config(**fields):
    return lambda d: edit_json(d / "tokenizer_config.json", lambda c: c.update(fields))


def edit_weights(change):
    def plant(d: Path) -> None:
        path = d / "model.safetensors"
        meta = read_header(path).get("__metadata__")
        tensors = {k: np.array(v) for k, v in read_safetensors(path).items()}
        change(tensors)
        write_safetensors(path, tensors, meta)
    return plant


def zero_rows(t):
    t[EMBED][[5, 17]] = 0.0
    t[EMBED][40] *= 1e-4


def add_random_head(t):
    t[HEAD] = np.random.default_rng(1).normal(size=t[EMBED].shape).astype(t[EMBED].dtype)


def both(*plants):
    def plant(d):
        for p in plants:
            p(d)
    return plant


def no_bos(d: Path) -> None:
    tok_config(add_bos_token=False)(d)
    edit_json(d / "tokenizer.json", lambda t: t.update(post_processor=None))


def lowercase_normalizer(d: Path) -> None:
    edit_json(d / "tokenizer.json", lambda t: t.update(
        normalizer={"type": "Sequence", "normalizers": [{"type": "Lowercase"}, t["normalizer"]]}))


# check id -> (family, plant). The clean case is the unmodified tiny checkpoint of the same family.
PLANTED = {
    "pad-equals-eos": ("gemma", config(pad_token_id=1)),
    "sliding-window-off-by-one": ("mistral", config(sliding_window=2047)),
    "sliding-window-exceeds-context": ("mistral", config(sliding_window=8192)),
    "max-position-rounded": ("llama", config(max_position_embeddings=128000)),
    "activation-fields-disagree": ("gemma2", config(hidden_act="gelu")),
    "activation-silently-overridden": ("gemma", config(hidden_act="gelu")),
    "untrained-embedding-rows": ("llama", edit_weights(zero_rows)),
    "tied-but-lm-head-differs": ("qwen3", edit_weights(add_random_head)),
    "tied-but-lm-head-stored": ("qwen3", edit_weights(lambda t: t.update({HEAD: t[EMBED].copy()}))),
    "untied-but-lm-head-missing": ("qwen2", edit_weights(lambda t: t.pop(HEAD))),
    "untied-but-lm-head-equals-embed": ("qwen2", edit_weights(lambda t: t.update({HEAD: t[EMBED].copy()}))),
    "dtype-mismatch": ("llama", config(dtype="bfloat16")),
    "rope-unknown-type": ("llama", rope({"rope_type": "ntk-by-parts", "rope_theta": 10000.0})),
    "rope-missing-field": ("llama", rope({"rope_type": "linear", "rope_theta": 10000.0})),
    "rope-longrope-factor-length": ("phi3", both(config(original_max_position_embeddings=2048), rope(
        {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
         "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}))),
    "rope-original-max-not-below-max": ("llama", rope({"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                                                       "original_max_position_embeddings": 4096})),
    "transformers-rejects-config": ("llama", rope({"rope_type": "linear", "rope_theta": 10000.0})),
    "tokenizer-unloadable": ("gemma", lambda d: (d / "tokenizer.json").write_text("{ this is not json")),
    # Seeded (untrained) weights cannot show a BOS convention, so dropping BOS there is the family-assumption warning;
    # the measured errors (tokenizer-no-bos, tokenizer-bos-unwanted) need trained weights: PLANTED_TRAINED below.
    "tokenizer-bos-unmeasured": ("llama", no_bos),
    "add-bos-token-disagrees": ("llama", tok_config(add_bos_token=False)),
    "chat-template-double-bos": ("gemma", tok_config(chat_template="{{ bos_token }}" + GEMMA_CHAT_TEMPLATE)),
    "chat-template-bos-retokenized": ("llama", tok_config(chat_template="{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")),
    "chat-template-missing-bos": ("gemma", tok_config(chat_template=GEMMA_CHAT_TEMPLATE.removeprefix("{{ bos_token }}"))),
    "special-token-missing": ("llama", config(eos_token_id=300)),
    "special-token-mismatch": ("gemma", config(bos_token_id=3)),
    "tokenizer-vocab-exceeds-model": ("llama", tok_config(extra_special_tokens=["<tool_call>", "</tool_call>"])),
    "tokenizer-parity": ("gemma", lowercase_normalizer),
    "config-exceeds-weights": ("llama", config(vocab_size=10**9)),
    "weights-missing": ("llama", edit_weights(lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))),
    "weights-shape-mismatch": ("llama", config(intermediate_size=64)),
    "weights-unexpected": ("llama", config(num_hidden_layers=3)),
    "weights-nonfinite": ("llama", edit_weights(lambda t: t[EMBED].__setitem__((17, 3), np.nan))),
}


# Checks that need weights trained with a known BOS convention: check id -> (trained checkpoint, plant). The clean
# case is the trained checkpoint as built (its tokenizer follows the convention the weights were trained with).
PLANTED_TRAINED = {"tokenizer-no-bos": ("bos-first", no_bos)}
# No small trained checkpoint loses clearly by an added BOS (measured, nats/token: the tiny llama of tiny_train 0.009;
# with its BOS row scaled 30x 0.045; one trained without BOS 0.003; SmolLM2-135M 0.040 with <|im_start|>, 0.047 with
# <|im_end|>). So this check's decision is tested on a stated measurement, through the check itself.
PLANTED_MEASUREMENT = {"tokenizer-bos-unwanted": dict(tokenizer_adds_bos=True, loss_with_bos=3.5, loss_without_bos=3.2)}


def train_bos_first(out: Path, steps: int = 120) -> Path:
    """A tiny llama trained (deterministically, ~10 s on 2 cores) on windows of the shipped text that each start with
    BOS, as real models trained with BOS are: unlike bughunt.tiny_train's windows cut anywhere from the text, these
    teach the weights to expect BOS first (measured: 0.24 nats/token worse without it)."""
    import torch
    import transformers

    from bughunt.tiny_tokenizer import CORPUS
    from bughunt.tiny_train import BATCH, LEARNING_RATE, LENGTH, deterministic_torch

    make_tiny_checkpoint("llama", out, seed=0)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    text = [p for p in CORPUS.read_text(encoding="utf-8").split("\n") if p.strip()]
    ids = np.asarray([i for p in text for i in tok(p, add_special_tokens=False)["input_ids"]])
    rng = np.random.default_rng(0)
    with deterministic_torch():
        torch.manual_seed(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
        model.train()
        for _ in range(steps):
            starts = rng.integers(0, len(ids) - LENGTH, size=BATCH)
            batch = torch.from_numpy(np.stack([np.concatenate([[tok.bos_token_id], ids[a:a + LENGTH - 1]]) for a in starts]))
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def trained_dirs(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = train_bos_first(tmp_path_factory.mktemp(kind) / "llama")
        return made[kind]

    return get


def test_every_check_has_a_planted_case():
    ruled = {cid for _, ids in RULES for cid in ids} | {"tokenizer-parity"}
    assert ruled == set(CHECKS) == set(PLANTED) | set(PLANTED_TRAINED) | set(PLANTED_MEASUREMENT)
    assert not set(PLANTED) & set(PLANTED_TRAINED) and not set(PLANTED) & set(PLANTED_MEASUREMENT)
    for c in CHECKS.values():
        assert c.severity in ("error", "warning", "info") and c.explanation and c.fix


@pytest.mark.parametrize("check_id", sorted(PLANTED))
def test_check_fires_on_planted_defect_and_not_on_clean(check_id, clean_dirs, clean_lint, tmp_path):
    family, plant = PLANTED[check_id]
    tokenizers = check_id == "tokenizer-parity"
    clean = clean_lint(family, tokenizers)
    assert check_id not in clean.fired(), format_table(clean)

    planted = tmp_path / family
    shutil.copytree(clean_dirs(family), planted)
    plant(planted)
    report = lint(planted, tokenizers=tokenizers)
    assert check_id in report.fired(), format_table(report)
    f = next(f for f in report.findings if f.check == check_id)
    assert f.severity == CHECKS[check_id].severity and f.message and f.fix
    assert report.exit_code == (1 if any(x.severity == "error" for x in report.findings) else 0)
    if CHECKS[check_id].severity == "error":
        assert report.exit_code == 1


@pytest.mark.slow
@pytest.mark.parametrize("check_id", sorted(PLANTED_TRAINED))
def test_bos_error_fires_only_with_a_measured_margin(check_id, trained_dirs, tmp_path):
    """On trained weights the tokenizer's BOS convention is judged by the loss it costs: the clean checkpoint passes
    (its tokenizer's convention measured as no worse), the planted one is an error whose finding states both losses,
    the token count and the margin."""
    from bughunt.lint.bos_measure import CLEAR_MARGIN

    kind, plant = PLANTED_TRAINED[check_id]
    clean = lint(trained_dirs(kind))
    assert clean.exit_code == 0 and not {"tokenizer-no-bos", "tokenizer-bos-unwanted", "tokenizer-bos-unmeasured"} & clean.fired(), \
        format_table(clean)
    note = next(c for c in clean.checks if c["id"] == check_id)
    assert note["status"] == "passed" and "nats/token" in note["reason"], note

    planted = tmp_path / "planted"
    shutil.copytree(trained_dirs(kind), planted)
    plant(planted)
    report = lint(planted)
    f = next(f for f in report.findings if f.check == check_id)
    assert f.severity == "error" and report.exit_code == 1
    d = f.details
    assert d["margin"] >= CLEAR_MARGIN and d["margin"] == pytest.approx(
        (d["loss_without_bos"] - d["loss_with_bos"]) * (-1 if d["tokenizer_adds_bos"] else 1))
    assert d["tokens"] >= 64 and not d["tokenizer_adds_bos"]
    for figure in (f"{d['loss_with_bos']:.3f}", f"{d['loss_without_bos']:.3f}", f"{d['margin']:.3f}", f"over {d['tokens']} tokens"):
        assert figure in f.message, f.message
    assert "tokenizer-bos-unmeasured" not in report.fired()


@pytest.mark.parametrize("check_id", sorted(PLANTED_MEASUREMENT))
@pytest.mark.parametrize("margin", [0.3, 0.05, -0.3])
def test_bos_decision_on_a_stated_measurement(check_id, margin, clean_dirs):
    """The measured checks fire exactly when the tokenizer's convention loses by CLEAR_MARGIN or more."""
    from bughunt.lint.bos_measure import CLEAR_MARGIN, BosMeasurement
    from bughunt.lint.catalog import _Context
    from bughunt.lint.tokenizer_checks import check_bos_measured

    given = PLANTED_MEASUREMENT[check_id]
    losses = {"loss_with_bos": 3.2 + margin, "loss_without_bos": 3.2} if given["tokenizer_adds_bos"] else \
        {"loss_with_bos": 3.2, "loss_without_bos": 3.2 + margin}
    ctx = _Context(clean_dirs("llama"))
    ctx.__dict__["bos_evidence"] = BosMeasurement(2, "<s>", given["tokenizer_adds_bos"], tokens=200, standard_error=0.01,
                                                  uniform_loss=5.5, seconds=1.0, **losses)
    found = check_bos_measured(ctx)
    assert [f.check for f in found] == ([check_id] if margin >= CLEAR_MARGIN else [])
    if found:
        assert found[0].severity == "error" and f"worse by {margin:.3f} nats/token" in found[0].message
    else:
        assert "nats/token" in ctx.notes[check_id]


def test_untrained_weights_fall_back_to_the_family_convention_as_a_warning(clean_dirs, tmp_path):
    """Seeded weights predict text no better than chance: no measured error, a warning that names what it assumes."""
    d = tmp_path / "llama"
    shutil.copytree(clean_dirs("llama"), d)
    no_bos(d)
    report = lint(d)
    assert report.exit_code == 0 and "tokenizer-no-bos" not in report.fired()
    f = next(f for f in report.findings if f.check == "tokenizer-bos-unmeasured")
    assert f.severity == "warning" and "assumes the llama convention of BOS first" in f.message and "untrained" in f.message
    skipped = {c["id"]: c["reason"] for c in report.checks if c["status"] == "skipped"}
    assert "look untrained" in skipped["tokenizer-no-bos"]


def test_pad_equals_eos_is_info_and_says_when_it_bites(clean_dirs, tmp_path):
    d = tmp_path / "gemma"
    shutil.copytree(clean_dirs("gemma"), d)
    config(pad_token_id=1)(d)
    f = next(f for f in lint(d).findings if f.check == "pad-equals-eos")
    assert f.severity == "info" and "harmless for a single unpadded sequence" in f.message and "fine-tuning" in f.message


def test_untrained_rows_are_listed_with_token_ids(clean_dirs, tmp_path):
    d = tmp_path / "llama"
    shutil.copytree(clean_dirs("llama"), d)
    edit_weights(zero_rows)(d)
    f = next(f for f in lint(d).findings if f.check == "untrained-embedding-rows")
    assert f.details["token_ids"] == [5, 17, 40] and f.details["zero_rows"] == 2
    assert f.details["tensor"] == EMBED and set(f.details["tokens"]) == {5, 17, 40}


def test_clean_tiny_checkpoints_have_no_errors(clean_lint):
    for family in ("gemma", "gemma3", "llama", "qwen2", "phi3"):
        report = clean_lint(family)
        assert report.exit_code == 0, format_table(report)
        # Gemma's released template writes BOS and its tokenizer adds BOS: only the re-tokenising hazard remains.
        assert report.fired() <= {"chat-template-bos-retokenized"}, format_table(report)


def test_checks_that_cannot_apply_are_skipped_with_a_reason(tmp_path):
    d = make_tiny_checkpoint("llama", tmp_path / "bare", seed=0)  # no sliding window
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "chat_template.jinja"):
        (d / name).unlink(missing_ok=True)  # and no tokenizer files
    report = lint(d)
    skipped = {c["id"]: c["reason"] for c in report.checks if c["status"] == "skipped"}
    assert "tokenizer-no-bos" in skipped and "no tokenizer files" in skipped["tokenizer-no-bos"]
    assert "sliding window" in skipped["sliding-window-off-by-one"]
    assert report.exit_code == 0


def test_json_document_and_html_section(clean_dirs, tmp_path):
    d = tmp_path / "mistral"
    shutil.copytree(clean_dirs("mistral"), d)
    config(sliding_window=4095)(d)
    report = lint(d)
    out = tmp_path / "lint.json"
    report.write_json(out)
    doc = json.loads(out.read_text())
    assert doc["schema"] == "bughunt.lint" and doc["version"] == 1
    assert doc["summary"]["warning"] >= 1 and doc["summary"]["exit_code"] == 0
    assert {c["id"] for c in doc["checks"]} == set(CHECKS) - {"tokenizer-parity"}
    assert any(f["check"] == "sliding-window-off-by-one" and f["fix"] for f in doc["findings"])
    frag = html_section(report)
    assert "sliding-window-off-by-one" in frag and "<table>" in frag and "<script" not in frag
    assert extra_section(report)["html"] == frag


def test_html_section_renders_in_the_report_template(clean_lint):
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("bughunt", "templates"), autoescape=True)
    tmpl = env.from_string("{% for s in extra_sections %}<h2>{{ s.title }}</h2>{{ s.html|safe }}{% endfor %}")
    html = tmpl.render(extra_sections=[extra_section(clean_lint("gemma"))])
    assert "<h2>Checkpoint lint</h2>" in html and "chat-template-bos-retokenized" in html


def test_cli_exit_codes(clean_dirs, tmp_path, capsys):
    assert main(["lint", str(clean_dirs("llama"))]) == 0
    bad = tmp_path / "bad"
    shutil.copytree(clean_dirs("llama"), bad)
    rope({"rope_type": "linear", "rope_theta": 10000.0})(bad)
    out = tmp_path / "out" / "lint.json"
    assert main(["lint", str(bad), "--json", str(out)]) == 1
    assert json.loads(out.read_text())["summary"]["exit_code"] == 1
    assert "rope-missing-field" in capsys.readouterr().out
    assert main(["lint", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_tokenizers_flag_reports_parity(clean_dirs, tmp_path, capsys):
    d = tmp_path / "gemma"
    shutil.copytree(clean_dirs("gemma"), d)
    lowercase_normalizer(d)
    out = tmp_path / "lint.json"
    assert main(["lint", str(d), "--tokenizers", "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "tokenizer parity" in text and "keras-hub" in text
    doc = json.loads(out.read_text())
    assert doc["tokenizer_parity"]["disagreements"]


def test_nan_row_in_the_embedding_is_reported_with_its_token_id(clean_dirs, tmp_path):
    d = tmp_path / "llama"
    shutil.copytree(clean_dirs("llama"), d)

    def plant(t):
        t[EMBED][200] = np.nan
        t["model.layers.2.mlp.down_proj.weight"][5, 7] = np.inf
    edit_weights(plant)(d)
    report = lint(d)
    found = {f.details["tensor"]: f for f in report.findings if f.check == "weights-nonfinite"}
    assert set(found) == {EMBED, "model.layers.2.mlp.down_proj.weight"}
    assert found[EMBED].details["nan"] == 48 and found[EMBED].details["first_row"] == 200
    assert "token id 200" in found[EMBED].message
    assert found["model.layers.2.mlp.down_proj.weight"].details == {**found["model.layers.2.mlp.down_proj.weight"].details,
                                                                    "nan": 0, "inf": 1, "first_row": 5}
    assert report.exit_code == 1


def test_nonfinite_scan_reads_in_chunks_and_handles_bf16(tmp_path):
    """With a chunk smaller than one tensor the scan walks it block by block and still finds the first bad row."""
    import ml_dtypes

    from bughunt.inputs.weights import scan_nonfinite
    from bughunt.safetensors_io import map_safetensors

    w = np.zeros((64, 8), dtype=ml_dtypes.bfloat16)
    w[41, 2] = np.inf
    w[50] = np.nan
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"w": w, "ok": np.ones((3, 3), dtype=np.float32), "ids": np.arange(4)})
    found = list(scan_nonfinite(map_safetensors(path), chunk_bytes=16 * 5))  # 5 rows per block
    assert [(f.tensor, f.nan, f.inf, f.first_row) for f in found] == [("w", 8, 1, 41)]


def test_config_larger_than_the_weights_is_an_error_from_the_cli(clean_dirs, tmp_path, capsys):
    d = tmp_path / "llama"
    shutil.copytree(clean_dirs("llama"), d)
    config(vocab_size=10**9)(d)
    assert main(["lint", str(d)]) == 1
    out = capsys.readouterr().out
    assert "ERROR [config-exceeds-weights] config.json implies a model of 9.6e+10 parameters" in out
    assert "ERROR [weights-shape-mismatch]" in out and "model.embed_tokens.weight is (256, 48), config implies (1000000000, 48)" in out


def test_layers_beyond_num_hidden_layers_are_named(clean_dirs, tmp_path):
    d = tmp_path / "llama"
    shutil.copytree(clean_dirs("llama"), d)
    config(num_hidden_layers=2)(d)
    f = next(f for f in lint(d).findings if f.check == "weights-unexpected")
    assert f.details["extra_layers"] == [2, 3]
    assert "2 layer(s) beyond num_hidden_layers=2 (model.layers.2..3, 18 tensors)" in f.message
