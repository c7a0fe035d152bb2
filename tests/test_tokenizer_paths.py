"""Each implementation's own tokenizer path (issue 14): the same text through hf's, keras-hub's and DeepMind gemma's
tokenizers; a difference is a finding reported before any numerics."""

import json
import shutil

import pytest

from bughunt.cli import main
from bughunt.implementations import available
from bughunt.tokenizer_paths import describe_difference

# Writes BOS itself, as Llama 3's and Gemma's released templates do.
BOS_TEMPLATE = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


@pytest.mark.parametrize("fed, path, expect", [
    ([2, 5, 6], [2, 5, 6], None),
    ([2, 5, 6], [2, 2, 5, 6], "adds BOS twice where the checkpoint's tokenizer adds BOS once; ids differ from position 1"),
    ([2, 5, 6], [5, 6], "adds no BOS where the checkpoint's tokenizer adds BOS once; ids differ from position 0"),
    ([2, 5, 6, 7, 8, 9, 10, 11, 12], [2, 5, 6, 7, 8, 9, 10, 99, 12], "ids differ from position 7 (9 ids vs 9)"),
    ([2, 5, 6], [2, 5, 6, 1], "ends with 1 EOS where the checkpoint's tokenizer ends with 0; ids differ from position 3"),
])
def test_a_difference_is_described_in_one_sentence(fed, path, expect):
    got = describe_difference(fed, path, bos=2, eos=1)
    assert got == expect if expect is None else got.startswith(expect), got


@pytest.mark.slow
@pytest.mark.skipif(not available("keras-jax"), reason="keras-hub and JAX are not installed")
def test_planted_double_bos_in_one_path_is_reported_before_any_numerics(tiny, tmp_path, capsys):
    """The plant: a chat template that writes BOS itself. hf's apply_chat_template tokenizes the rendered text
    without adding special tokens; keras-hub's preprocessor (no chat templates of its own) is given the rendered
    text and adds its start token in front of the template's: BOS twice."""
    checkpoint = tmp_path / "llama-chat"
    shutil.copytree(tiny["llama"], checkpoint)
    config_path = checkpoint / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": BOS_TEMPLATE}))
    chat, out = tmp_path / "chat.json", tmp_path / "out"
    chat.write_text(json.dumps([{"role": "user", "content": "Where are you going?"}]))
    capsys.readouterr()
    main(["compare", str(checkpoint), "--impl", "hf", "--impl", "keras-jax", "--impl", "reference", "--chat", str(chat),
          "--no-branches", "--out", str(out)])
    terminal = capsys.readouterr().out
    d = json.loads((out / "result.json").read_text())
    fed = d["inputs"]["tokens"][0]
    assert fed[0] == 2 and fed[1] != 2  # the ids every implementation got: the template's one BOS
    paths = d["inputs"]["text"]["paths"]
    assert paths["hf"]["agrees"] and paths["hf"]["rows"] == [fed]
    assert not paths["keras-jax"]["agrees"] and paths["keras-jax"]["rows"][0][:2] == [2, 2]
    first = d["findings"][0]
    assert first["kind"] == "tokenizer" and first["implementation"] == "keras-jax", d["findings"]
    assert "adds BOS twice where the checkpoint's tokenizer adds BOS once" in first["message"]
    kinds = [f["kind"] for f in d["findings"]]
    numerics = [i for i, k in enumerate(kinds) if k not in ("tokenizer", "input", "config")]
    assert numerics and min(numerics) > 0, kinds  # keras-hub's converter fails on this llama (head_dim): after it
    # terminal and report: the tokenizer finding comes before the numerics
    assert terminal.index("adds BOS twice") < terminal.index("first above floor")
    html = (out / "report.html").read_text()
    assert html.index("adds BOS twice") < html.index("Per-layer divergence")


@pytest.mark.skipif(not available("deepmind"), reason="DeepMind gemma is not installed")
def test_deepmind_path_reads_tokenizer_model_in_its_worker(tiny, tmp_path):
    """gm.text reads only a SentencePiece tokenizer.model (the tiny checkpoints ship tokenizer.json): with one added,
    its path runs in the deepmind worker and encodes as its Sampler does, BOS first."""
    import sentencepiece

    from bughunt.tiny_tokenizer import CORPUS
    from bughunt.probes.tokenizer_path import TokenizeJob, tokenize
    from bughunt.worker import WorkerFailure, WorkerPool

    checkpoint = tmp_path / "gemma-spm"
    shutil.copytree(tiny["gemma"], checkpoint)
    sentencepiece.SentencePieceTrainer.train(input=str(CORPUS), model_prefix=str(checkpoint / "tokenizer"), vocab_size=200,
                                             model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2)
    text = "The miller sat by the door."
    job = TokenizeJob("deepmind", checkpoint, {"prompts": [text]})
    with WorkerPool() as pool:
        answer = tokenize(pool, job)
        with pytest.raises(WorkerFailure, match="reads a SentencePiece tokenizer.model, which this checkpoint lacks"):
            tokenize(pool, TokenizeJob("deepmind", tiny["gemma"], job.text))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    assert answer["path"].startswith("DeepMind gemma ") and "Gemma2Tokenizer.encode(add_bos=True)" in answer["path"]
    assert answer["rows"] == [[2] + list(sp.encode(text))]


@pytest.mark.skipif(not available("llamacpp"), reason="llama-cpp-python is not installed")
def test_llamacpp_path_tokenizes_the_converted_vocabulary_in_its_worker(tiny):
    """llama.cpp's tokenizer on the vocabulary llama.cpp's converter wrote. The tiny llama's tokenizer.json is a BPE
    tokenizer the converter types as SentencePiece ("llama"), so llama.cpp splits the same text differently from the
    checkpoint's tokenizer after two words: the bug class 'tokenizer misdetected by the converter'. On text its
    vocabulary cannot encode (no byte-fallback pieces) llama.cpp aborts (in a forked child, so the worker lives on);
    the failure names the C++ exception. A GGUF converted without a vocabulary (the converter refused the tokenizer) has no path at all."""
    import transformers

    from bughunt.probes.tokenizer_path import TokenizeJob, tokenize
    from bughunt.worker import WorkerFailure, WorkerPool

    text = "The miller sat by the door."
    fed = transformers.AutoTokenizer.from_pretrained(str(tiny["llama"]))(text)["input_ids"]
    job = TokenizeJob("llamacpp", tiny["llama"], {"prompts": [text]})
    with WorkerPool() as pool:
        answer = tokenize(pool, job)
        with pytest.raises(WorkerFailure, match=r"aborted the process \(signal SIGABRT\): terminate called .*std::out_of_range"):
            tokenize(pool, TokenizeJob("llamacpp", tiny["llama"], {"prompts": ["hello\n\n  world"]}))
        with pytest.raises(WorkerFailure, match="converted without a vocabulary"):
            tokenize(pool, TokenizeJob("llamacpp", tiny["qwen3"], job.text))
    assert answer["path"].startswith("llama-cpp-python 0.3.36 Llama.tokenize on the GGUF's llama vocabulary")
    row = answer["rows"][0]
    assert row[0] == fed[0] == 2 and row[1:3] == fed[1:3]  # BOS as the GGUF's add_bos_token says, the same first words
    assert describe_difference(fed, row, bos=2, eos=1).startswith("ids differ from position 3"), (fed, row)


@pytest.mark.skipif(not available("llamacpp"), reason="llama-cpp-python is not installed")
def test_llamacpp_path_difference_comes_first_in_compare(tiny, tmp_path, capsys):
    """End to end: the llama.cpp path's difference is a finding ahead of the numerics, and llama.cpp's forward pass on
    the ids every implementation was fed still runs and is compared."""
    out = tmp_path / "out"
    capsys.readouterr()
    main(["compare", str(tiny["llama"]), "--impl", "llamacpp[kv_cache=f32,flash_attn=off]", "--impl", "reference",
          "--prompt", "The miller sat by the door.", "--no-branches", "--out", str(out)])
    d = json.loads((out / "result.json").read_text())
    assert not d["inputs"]["text"]["paths"]["llamacpp"]["agrees"]
    first = d["findings"][0]
    assert first["kind"] == "tokenizer" and first["implementation"].startswith("llamacpp"), d["findings"]
    assert "ids differ from position 3" in first["message"]
    assert [c["candidate"] for c in d["comparisons"]] == ["llamacpp[kv_cache=f32,flash_attn=off]"]
