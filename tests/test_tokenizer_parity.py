"""Tokenizer parity over the tricky-strings corpus, and the tiny tokenizers it runs on in tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import per_family

from bughunt.errors import BughuntError
from bughunt.implementations import available
from bughunt.tiny import TINY_FAMILIES, tiny_config_dict
from bughunt.tiny_tokenizer import write_tiny_tokenizer
from bughunt.tokenizer_parity import (TokenizerImpl, compare_tokenizers, format_parity, tokenizer_parity,
                                      tricky_strings)


def _write(family: str, out: Path) -> Path:
    _, kw = tiny_config_dict(family)
    write_tiny_tokenizer(out, kw["vocab_size"], kw["bos_token_id"], kw["eos_token_id"], kw.get("pad_token_id"), family)
    # AutoTokenizer reads config.json to pick the tokenizer class; a config without weights is enough here.
    import transformers

    getattr(transformers, tiny_config_dict(family)[0])(**kw).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    return per_family(tmp_path_factory.mktemp("tok"), _write)


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False))


# ---- the tiny tokenizers ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_tokenizer_matches_the_model_config(family, tok_dirs):
    import transformers

    d = tok_dirs(family)
    _, kw = tiny_config_dict(family)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    assert len(tok) == kw["vocab_size"] == 256
    assert tok.bos_token_id == 2 and tok.eos_token_id == 1
    assert tok.pad_token_id == kw.get("pad_token_id")
    ids = tok("The river ran past the old mill.")["input_ids"]
    assert max(ids) < 256 and len(ids) < 20  # merges learned from the shipped corpus
    assert (ids[0] == 2) == (family not in ("qwen2", "qwen3"))
    assert tok.decode(ids, skip_special_tokens=True).strip() == "The river ran past the old mill."


def test_tiny_tokenizer_is_deterministic(tmp_path):
    a = write_tiny_tokenizer(tmp_path / "a", 256, 2, 1, 0, "gemma")
    b = write_tiny_tokenizer(tmp_path / "b", 256, 2, 1, 0, "gemma")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_tiny_gemma_tokenizer_has_specials_and_chat_template(tok_dirs):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tok_dirs("gemma"))
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<eos>", "<bos>", "<unk>"]
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True, add_generation_prompt=True,
                                  return_dict=False)
    assert ids[0] == 2 and ids[1] == tok.convert_tokens_to_ids("<start_of_turn>")


def test_tiny_tokenizer_rejects_ids_outside_the_vocab(tmp_path):
    with pytest.raises(BughuntError, match="outside the vocabulary"):
        write_tiny_tokenizer(tmp_path, 256, 300, 1, 0, "gemma")


# ---- parity --------------------------------------------------------------------------------------


def test_corpus_covers_the_tricky_cases():
    names = dict(tricky_strings())
    for n in ("leading_spaces", "trailing_spaces", "newline", "tabs", "accents_combining", "cjk",
              "emoji_zwj_family", "long_number", "special_as_text_bos", "long_word"):
        assert n in names
    assert "\u200d" in names["emoji_zwj_family"] and "\u0301" in names["accents_combining"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma", "llama", "qwen2"])
def test_clean_tiny_tokenizers_agree_and_skips_are_recorded(family, tok_dirs):
    report = tokenizer_parity(tok_dirs(family))
    assert [i["name"] for i in report.implementations] == ["tokenizers", "transformers"]
    assert report.ok, format_parity(report)
    skipped = {s["name"]: s["reason"] for s in report.skipped}
    assert "no tokenizer.model" in skipped["sentencepiece"]
    assert "keras-hub" in skipped and skipped["keras-hub"]
    assert report.strings == len(tricky_strings())


def test_parity_finds_a_normalizer_transformers_ignores(tok_dirs, tmp_path):
    # transformers 5's GemmaTokenizer rebuilds its normalizer instead of reading tokenizer.json's.
    d = tmp_path / "gemma"
    shutil.copytree(tok_dirs("gemma"), d)
    edit_json(d / "tokenizer.json", lambda t: t.update(
        normalizer={"type": "Sequence", "normalizers": [{"type": "Lowercase"}, t["normalizer"]]}))
    report = tokenizer_parity(d)
    by_name = {x["name"]: x for x in report.disagreements}
    plain = by_name["plain"]  # "The quick ..." lowercases to different pieces
    assert plain["reference"] == "tokenizers" and plain["candidate"] == "transformers"
    assert plain["text"].startswith("The quick")
    assert plain["reference_ids"] != plain["candidate_ids"]
    assert plain["body_differs"] and not plain["bos_differs"]
    assert "digits" not in by_name  # no letters, nothing to lowercase
    json.dumps(report.to_dict())


def test_parity_finds_a_bos_difference(tok_dirs):
    # A second variant of the same tokenizer.json without the post-processor that adds BOS.
    from tokenizers import Tokenizer

    path = tok_dirs("gemma") / "tokenizer.json"
    fast = Tokenizer.from_file(str(path))
    data = json.loads(path.read_text())
    data["post_processor"] = None
    variant = Tokenizer.from_str(json.dumps(data))
    impls = [TokenizerImpl("fast", lambda s: fast.encode(s).ids, "tokenizer.json", 2, 1),
             TokenizerImpl("no-bos", lambda s: variant.encode(s).ids, "no post-processor", 2, 1)]
    report = compare_tokenizers(impls, tricky_strings())
    assert len(report.disagreements) == report.strings
    for x in report.disagreements:
        assert x["bos_differs"] and not x["body_differs"] and not x["eos_differs"]
        assert x["reference_ids"] == [2] + x["candidate_ids"]


def test_compare_tokenizers_finds_a_changed_merge(tok_dirs):
    from tokenizers import Tokenizer

    path = tok_dirs("llama") / "tokenizer.json"
    fast = Tokenizer.from_file(str(path))
    data = json.loads(path.read_text())
    data["model"]["merges"] = data["model"]["merges"][1:]  # drop the most frequent merge
    variant = Tokenizer.from_str(json.dumps(data))
    impls = [TokenizerImpl("fast", lambda s: fast.encode(s).ids, "tokenizer.json", 2, 1),
             TokenizerImpl("variant", lambda s: variant.encode(s).ids, "one merge fewer", 2, 1)]
    report = compare_tokenizers(impls, tricky_strings())
    assert report.disagreements and all(not x["bos_differs"] and x["body_differs"] for x in report.disagreements)
    first = report.disagreements[0]
    assert first["reference_ids"][first["first_difference"]] != first["candidate_ids"][first["first_difference"]]


def test_parity_with_fewer_than_two_implementations(tmp_path):
    import transformers

    transformers.LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2).save_pretrained(tmp_path)
    report = tokenizer_parity(tmp_path)
    assert report.implementations == [] and report.ok
    assert {s["name"] for s in report.skipped} == {"tokenizers", "transformers", "sentencepiece", "keras-hub", "llama.cpp"}
    assert "nothing to compare" in format_parity(report)


@pytest.mark.slow
@pytest.mark.skipif(not available("llamacpp"), reason="llama-cpp-python is not installed")
def test_parity_includes_llamacpp_and_records_its_aborts(tiny):
    """On a checkpoint llama.cpp's converter writes a vocabulary for (the tiny llama: typed SentencePiece although it
    is a byte-level BPE), llama.cpp's tokenizer joins the parity check; strings it cannot encode abort it in a forked
    child and are recorded as that string's error, and the others are compared id by id."""
    report = tokenizer_parity(tiny["llama"])
    assert [i["name"] for i in report.implementations] == ["tokenizers", "transformers", "llama.cpp"]
    mine = [d for d in report.disagreements if d["candidate"] == "llama.cpp"]
    aborted = [d for d in mine if d.get("candidate_error")]
    assert aborted and all("std::out_of_range" in d["candidate_error"] for d in aborted), aborted[:1]
    compared = [d for d in mine if not d.get("candidate_error")]
    assert compared and all(d["body_differs"] and not d["bos_differs"] for d in compared), compared[:1]
    assert {d["name"] for d in report.disagreements if d["candidate"] == "transformers"} == set()
