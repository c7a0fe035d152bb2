"""Text in (issue 14): --prompt, --prompt-file and --chat go through the checkpoint's tokenizer once, and the same
ids reach every implementation; result.json records the text, the ids, the tokenizer and its BOS rule."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from badinput import assert_refused
from bughunt.cli import main
from bughunt.text import default_request, encode_text, request

PROMPT = "The stranger came along the road from the north."


def _result(out):
    return json.loads((out / "result.json").read_text())


def test_a_prompt_gives_the_same_trace_as_its_explicit_ids(tiny, tmp_path):
    by_text, by_ids = tmp_path / "text", tmp_path / "ids"
    argv = ["compare", str(tiny["gemma"]), "--impl", "hf", "--impl", "reference", "--in-process", "--no-branches"]
    assert main(argv + ["--prompt", PROMPT, "--out", str(by_text)]) == 0
    d = _result(by_text)
    text = d["inputs"]["text"]
    ids = d["inputs"]["tokens"][0]
    assert text["kind"] == "prompt" and text["rows"][0]["text"] == PROMPT and text["rows"][0]["ids"] == ids
    assert ids[0] == 2 and ids.count(2) == 1 and "BOS '<bos>' (id 2) prepended" in text["bos"]
    assert "AutoTokenizer (GemmaTokenizer)" in text["tokenizer"]
    assert main(argv + ["--tokens", ",".join(map(str, ids)), "--out", str(by_ids)]) == 0
    assert "text" not in _result(by_ids)["inputs"]
    for label in ("hf", "reference"):
        a, b = load_file(str(by_text / "traces" / f"{label}.safetensors")), load_file(str(by_ids / "traces" / f"{label}.safetensors"))
        assert a.keys() == b.keys() and len(a) > 3
        for point in a:
            np.testing.assert_array_equal(a[point], b[point], err_msg=f"{label} {point}")
    assert PROMPT in (by_text / "report.html").read_text()


def test_several_prompts_are_rows_cut_to_the_shortest(tiny, tmp_path):
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("The water was high and brown.\n")
    text = request([("prompt", PROMPT), ("prompt-file", str(prompt_file))])
    encoded = encode_text(tiny["llama"], text)
    full = [r["ids"] for r in encoded.rows]
    assert encoded.rows[1]["text"] == "The water was high and brown."  # one final newline dropped
    n = min(map(len, full))
    assert encoded.tokens.shape == (2, n) and encoded.tokens.tolist() == [r[:n] for r in full]
    cut = [r for r in encoded.rows if "cut_from" in r]
    assert len(cut) == 1 and any("cut from" in note for note in encoded.notes)


def test_qwen_adds_no_bos_and_says_so(tiny):
    encoded = encode_text(tiny["qwen2"], request([("prompt", PROMPT)]))
    assert encoded.tokens[0, 0] != 2 and encoded.bos.startswith("no BOS")


def test_chat_renders_through_the_template_with_one_bos(tiny, tmp_path):
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"role": "user", "content": "Where are you going?"}]))
    out = tmp_path / "out"
    assert main(["compare", str(tiny["gemma"]), "--impl", "hf", "--in-process", "--no-branches", "--chat", str(chat),
                 "--out", str(out)]) == 0
    d = _result(out)
    row = d["inputs"]["text"]["rows"][0]
    assert row["text"].startswith("<bos><start_of_turn>user\nWhere are you going?") and row["text"].endswith("model\n")
    assert row["ids"][0] == 2 and row["ids"].count(2) == 1 and row["add_generation_prompt"] is True


def test_no_ids_and_no_text_uses_the_shipped_default_text(tiny, tmp_path):
    out = tmp_path / "out"
    assert main(["decode", str(tiny["llama"]), "--impl", "hf", "--prefill", "4", "--out", str(out)]) == 0
    text = _result(out)["inputs"]["text"]
    assert text["kind"] == "default text" and text["rows"][0]["text"] == default_request().prompts[0]


@pytest.mark.slow
def test_text_in_a_ci_matrix_end_to_end(tmp_path):
    (tmp_path / "p.txt").write_text("He carried a pack on his back.\n")
    matrix = tmp_path / "m.toml"
    matrix.write_text(f'implementations = ["hf"]\ndtypes = ["fp32"]\nbranches = false\n'
                      f'tokens = {{ prompt = "{PROMPT}", prompt_file = "p.txt" }}\n'
                      '[[checkpoints]]\ntiny = "llama"\ntrained = true\n')
    base = tmp_path / "baselines"
    assert main(["ci", str(matrix), "--baseline", str(base), "--update-baseline", "--out", str(tmp_path / "rec")]) == 0
    assert main(["ci", str(matrix), "--baseline", str(base), "--out", str(tmp_path / "run")]) == 0
    assert (base / "llama-trained__hf-fp32__cpu.json").exists()
    html = next((tmp_path / "run").rglob("report.html")).read_text()
    assert PROMPT in html and "He carried a pack" in html and "its own tokenizer path" in html
    # other text is other ids: the stored baseline no longer matches
    matrix.write_text(matrix.read_text().replace("north", "south"))
    assert main(["ci", str(matrix), "--baseline", str(base), "--out", str(tmp_path / "run2")]) == 2


# ---- bad input: one message, exit 2, nothing written ------------------------------------------------------------

@pytest.fixture(scope="module")
def untokenized(tiny, tmp_path_factory):
    """The tiny llama checkpoint without its tokenizer files."""
    d = tmp_path_factory.mktemp("untok") / "llama"
    shutil.copytree(tiny["llama"], d, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    return d


@pytest.mark.parametrize("command", ["compare", "sweep", "decode"])
def test_empty_prompt_is_refused(tiny, tmp_path, capsys, command):
    out = tmp_path / "out"
    assert_refused(capsys, [command, str(tiny["llama"]), "--prompt", "", "--out", str(out)], r"--prompt is empty",
                   [out, tiny["llama"]])


def test_prompt_longer_than_the_positions_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert_refused(capsys, ["compare", str(tiny["llama"]), "--prompt", "the water " * 3000, "--out", str(out)],
                   r"longer than the model's 4096 positions \(max_position_embeddings", [out, tiny["llama"]])


def test_prompt_on_a_checkpoint_without_a_tokenizer_is_refused(untokenized, tmp_path, capsys):
    out = tmp_path / "out"
    assert_refused(capsys, ["compare", str(untokenized), "--prompt", PROMPT, "--out", str(out)],
                   r"has no tokenizer files .*--tokens", [out, untokenized])


def test_default_text_falls_back_to_seeded_ids_without_a_tokenizer(untokenized, tmp_path):
    out = tmp_path / "out"
    assert main(["compare", str(untokenized), "--impl", "hf", "--in-process", "--no-branches", "--out", str(out)]) == 0
    d = _result(out)
    assert "text" not in d["inputs"] and len(d["inputs"]["tokens"][0]) == 16


@pytest.mark.parametrize("content, message", [
    ("{not json", r"--chat .* is not valid JSON"),
    ('{"role": "user", "content": "hi"}', r"--chat .*expected a valid list"),
    ("[]", r"--chat .*at least 1 item"),
    ('[{"role": "user"}]', r"--chat .*messages\[0\]\.content' is missing"),
    ('[{"role": "user", "content": 5}]', r"--chat .*messages\[0\]\.content' is an integer 5; expected a valid string"),
    ('[{"role": "", "content": "hi"}]', r"--chat .*messages\[0\]\.role' is a string ''; expected .*at least 1 character"),
])
def test_malformed_chat_file_is_refused(tiny, tmp_path, capsys, content, message):
    chat, out = tmp_path / "chat.json", tmp_path / "out"
    chat.write_text(content)
    assert_refused(capsys, ["compare", str(tiny["gemma"]), "--chat", str(chat), "--out", str(out)], message,
                   [out, tiny["gemma"], chat])


def test_chat_without_a_template_and_text_with_ids_are_refused(tiny, tmp_path, capsys):
    chat, out = tmp_path / "chat.json", tmp_path / "out"
    chat.write_text('[{"role": "user", "content": "hi"}]')
    assert_refused(capsys, ["compare", str(tiny["llama"]), "--chat", str(chat), "--out", str(out)], r"no chat template", [out])
    assert_refused(capsys, ["compare", str(tiny["llama"]), "--prompt", "hi", "--tokens", "2,3", "--out", str(out)],
                   r"either token ids .* or text", [out])
    assert_refused(capsys, ["compare", str(tiny["llama"]), "--prompt-file", str(tmp_path / "none.txt"), "--out", str(out)],
                   r"--prompt-file .*none.txt does not exist", [out])
