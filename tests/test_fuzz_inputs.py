"""Property-based fuzzing of the two inputs every command reads first: config.json (values and types of the fields the
Spec reads, nested RoPE parameters, deleted fields) and the safetensors header (dtype, shape, offsets, the header's JSON
shape, truncated files). Each example damages a copy of a tiny checkpoint and runs `lint` and `compare --impl
reference --in-process` on it. The property: exit 0, 1 or 2 only; never a traceback (an exception escaping main fails
the example); exit 2 always comes with a message; the checkpoint is unchanged.

Deterministic in CI: derandomized, no example database. Run with -s to see how many examples ran and were refused."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from badinput import snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bughunt.cli import main
from bughunt.inputs.config import ConfigFile

EXAMPLES = 250
SETTINGS = settings(derandomize=True, database=None, max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
OUTCOMES: dict[str, Counter] = {"config": Counter(), "header": Counter()}
DELETE = "<delete>"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)
plausible_numbers = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 8, 12, 16, 47, 48, 96, 256, 4096, 10**12, 2**63, -1, 0.5, 1e-6, 1e9]),
                              st.integers(-3, 5000), st.floats(-10, 1e7))
CONFIG_FIELDS = sorted(set(ConfigFile.model_fields) - {"model_type"}) + [
    "model_type", "rope_parameters.rope_theta", "rope_parameters.rope_type", "rope_parameters.factor",
    "rope_parameters.partial_rotary_factor", "rope_parameters.original_max_position_embeddings", "mlp_bias"]
rope_types = st.sampled_from(["default", "linear", "dynamic", "yarn", "llama3", "longrope", "su", "bogus"])
config_mutation = st.tuples(st.sampled_from(CONFIG_FIELDS),
                            st.one_of(st.just(DELETE), json_values, plausible_numbers, rope_types))

DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "Q4_K", "", "f32"]
header_mutation = st.one_of(
    st.tuples(st.just("dtype"), st.integers(0, 40), st.one_of(st.sampled_from(DTYPES), json_values)),
    st.tuples(st.just("shape"), st.integers(0, 40), st.one_of(st.lists(st.integers(-2, 300), max_size=3), json_values)),
    st.tuples(st.just("offsets"), st.integers(0, 40), st.tuples(st.sampled_from([0, 0, 4, -4]) | st.integers(-64, 64),
                                                               st.sampled_from([0, 0, 4, -4]) | st.integers(-64, 64))),
    st.tuples(st.just("reverse-shape"), st.integers(0, 40), st.none()),
    st.tuples(st.just("offsets-raw"), st.integers(0, 40), json_values),
    st.tuples(st.just("delete-field"), st.integers(0, 40), st.sampled_from(["dtype", "shape", "data_offsets"])),
    st.tuples(st.just("entry"), st.integers(0, 40), json_values),
    st.tuples(st.just("metadata"), st.just(0), json_values),
    st.tuples(st.just("header"), st.just(0), json_values),
    st.tuples(st.just("truncate"), st.integers(0, 40), st.floats(0, 1)),
)


@pytest.fixture(scope="module")
def sources(tiny):
    return {family: tiny[family] for family in ("llama", "gemma2", "qwen2")}


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    for kind, counts in OUTCOMES.items():
        if counts:
            print(f"\nfuzz {kind}: {counts['examples']} examples; " + ", ".join(
                f"{cmd} exit {code}: {counts[(cmd, code)]}" for cmd in ("lint", "compare") for code in (0, 1, 2)))


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def check_contract(ck: Path, kind: str, capsys) -> None:
    before = snapshot([ck])
    with tempfile.TemporaryDirectory() as out:
        for cmd, argv in (("lint", ["lint", str(ck)]),
                          ("compare", ["compare", str(ck), "--impl", "reference", "--in-process", "--tokens", "2,17,99",
                                       "--out", str(Path(out) / "run")])):
            code, text = run_cli(argv, capsys)
            OUTCOMES[kind][(cmd, code)] += 1
            assert code in (0, 1, 2), f"{cmd} exit {code}: {text[-2000:]}"
            assert "Traceback" not in text, text
            if code == 2:
                assert "bughunt: error: " in text and len(text.split("bughunt: error: ", 1)[1].strip()) > 20, text
    assert snapshot([ck]) == before, "the checkpoint changed"
    OUTCOMES[kind]["examples"] += 1


def apply_config(cfg: dict, field: str, value) -> None:
    target, key = cfg, field
    if "." in field:
        outer, key = field.split(".", 1)
        if not isinstance(cfg.get(outer), dict):
            cfg[outer] = {}
        target = cfg[outer]
    if value == DELETE:
        target.pop(key, None)
    else:
        target[key] = value


@pytest.mark.slow
@SETTINGS
@given(family=st.sampled_from(["llama", "gemma2", "qwen2"]), mutations=st.lists(config_mutation, min_size=1, max_size=3))
def test_fuzzed_config_never_crashes(sources, capsys, family, mutations):
    with tempfile.TemporaryDirectory() as d:
        ck = Path(d) / "ck"
        shutil.copytree(sources[family], ck)
        cfg = json.loads((ck / "config.json").read_text())
        for field, value in mutations:
            apply_config(cfg, field, value)
        (ck / "config.json").write_text(json.dumps(cfg))
        check_contract(ck, "config", capsys)


def damage_header(raw: bytes, op: str, index: int, value) -> bytes:
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    name = names[index % len(names)]
    if op == "truncate":
        return raw[:int(len(raw) * value)]
    if op == "dtype":
        header[name]["dtype"] = value
    elif op == "shape":
        header[name]["shape"] = value
    elif op == "offsets":
        start, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [start + value[0], end + value[1]]
    elif op == "reverse-shape":  # the same bytes read with the axes swapped: a header that is valid but wrong
        header[name]["shape"] = header[name]["shape"][::-1]
    elif op == "offsets-raw":
        header[name]["data_offsets"] = value
    elif op == "delete-field":
        del header[name][value]
    elif op == "entry":
        header[name] = value
    elif op == "metadata":
        header["__metadata__"] = value
    elif op == "header":
        header = value
    hb = json.dumps(header).encode()
    return len(hb).to_bytes(8, "little") + hb + data


@SETTINGS
@given(family=st.sampled_from(["llama", "gemma2", "qwen2"]), mutations=st.lists(header_mutation, min_size=1, max_size=2))
def test_fuzzed_safetensors_header_never_crashes(sources, capsys, family, mutations):
    with tempfile.TemporaryDirectory() as d:
        ck = Path(d) / "ck"
        shutil.copytree(sources[family], ck)
        path = ck / "model.safetensors"
        raw = path.read_bytes()
        for op, index, value in mutations:
            try:
                raw = damage_header(raw, op, index, value)
            except (ValueError, KeyError, TypeError, AttributeError, IndexError, ZeroDivisionError):
                break  # an earlier mutation already left no header to edit; test what we have
        path.write_bytes(raw)
        check_contract(ck, "header", capsys)
