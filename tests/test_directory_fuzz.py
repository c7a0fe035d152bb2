"""The checkpoint directory layer under damage: symlinks (loops, dangling, to directories, to devices, out of the
directory), the shard index against its shards (wrong shard, absent shard, a tensor in two shards, tensors the index
does not list, entries that are not file names) and the set of weight files (duplicates across unindexed shards, empty
files, directories named like files). Each named case either is refused (exit 2, one message naming the path or
tensor, no traceback, nothing changed) or is legitimately fine and loads the same weights as the undamaged checkpoint.
Then a property-based fuzz of the same moves, judged by an independent reader (the safetensors package) of what the
directory holds: bughunt accepts exactly the directories that reader finds consistent."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from badinput import assert_refused, shard_checkpoint, snapshot, write_index
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bughunt.checkpoint import load_weights
from bughunt.cli import main
from bughunt.errors import BughuntError
from bughunt.safetensors_io import read_safetensors, write_safetensors

SHARD = "model-{:05d}-of-00003.safetensors"
S1, S2, S3 = (SHARD.format(i) for i in (1, 2, 3))


@pytest.fixture(scope="module")
def source(tiny):
    return tiny["llama"]


@pytest.fixture(scope="module")
def original(source):
    return {k: np.array(v) for k, v in load_weights(source).items()}


def loop(path: Path, target: str | None = None) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    os.symlink(target or path.name, path)


def _held(ck: Path, shard: str) -> list[str]:
    return sorted(read_safetensors(ck / shard))


def swap_shards(ck: Path) -> None:
    """The index places a tensor of shard 1 in shard 2 and one of shard 2 in shard 1."""
    wm = shard_checkpoint(ck)
    a, b = _held(ck, S1)[0], _held(ck, S2)[0]
    wm[a], wm[b] = S2, S1
    write_index(ck, wm)


def copy_tensor(ck: Path, index: bool = True) -> None:
    """A tensor of shard 1 stored in shard 2 as well (scaled, so the copies differ)."""
    shard_checkpoint(ck, index=index)
    one, two = read_safetensors(ck / S1), read_safetensors(ck / S2)
    name = sorted(one)[0]
    two[name] = one[name] * 2
    write_safetensors(ck / S2, two)


def edit_index(change):
    def damage(ck: Path) -> None:
        wm = shard_checkpoint(ck)
        change(ck, wm)
        write_index(ck, wm)
    return damage


def outside(ck: Path) -> None:
    real = ck.parent / "elsewhere" / "weights.safetensors"
    real.parent.mkdir()
    shutil.move(ck / "model.safetensors", real)
    os.symlink(real, ck / "model.safetensors")


def inside_chain(ck: Path) -> None:
    (ck / "blobs").mkdir()
    shutil.move(ck / "model.safetensors", ck / "blobs" / "abc123")
    os.symlink("blobs/abc123", ck / "link")
    os.symlink("link", ck / "model.safetensors")


def subdir_shard(ck: Path) -> None:
    wm = shard_checkpoint(ck)
    (ck / "sub").mkdir()
    shutil.move(ck / S2, ck / "sub" / S2)
    write_index(ck, {n: f"sub/{f}" if f == S2 else f"./{f}" if f == S3 else f for n, f in wm.items()})


def fifo(ck: Path) -> None:
    (ck / "model.safetensors").unlink()
    os.mkfifo(ck / "model.safetensors")


def dir_named(name: str):
    def damage(ck: Path) -> None:
        if os.path.lexists(ck / name):
            (ck / name).unlink()
        (ck / name).mkdir()
    return damage


REFUSED = {
    # symlinks
    "weights-self-loop": (lambda ck: loop(ck / "model.safetensors"), r"model\.safetensors is a symlink loop"),
    "weights-two-link-loop": (lambda ck: (loop(ck / "model.safetensors", "b"), os.symlink("model.safetensors", ck / "b")),
                              r"model\.safetensors is a symlink loop"),
    "config-self-loop": (lambda ck: loop(ck / "config.json"), r"config .*config\.json is a symlink loop"),
    "index-self-loop": (lambda ck: (shard_checkpoint(ck), loop(ck / "model.safetensors.index.json")), r"shard index .* is a symlink loop"),
    "shard-self-loop": (lambda ck: (shard_checkpoint(ck), loop(ck / S2)), rf"{S2} is a symlink loop"),
    "unindexed-shard-loop": (lambda ck: (shard_checkpoint(ck, index=False), loop(ck / "zz.safetensors")), r"zz\.safetensors is a symlink loop"),
    "weights-dangling": (lambda ck: loop(ck / "model.safetensors", "gone.safetensors"), r"model\.safetensors is a link that cannot be followed"),
    "shard-dangling": (lambda ck: (shard_checkpoint(ck), loop(ck / S3, "gone.safetensors")), rf"{S3} is a link that cannot be followed"),
    "weights-link-to-directory": (lambda ck: ((ck / "d").mkdir(), loop(ck / "model.safetensors", "d")), r"model\.safetensors is a directory"),
    "weights-link-to-device": (lambda ck: loop(ck / "model.safetensors", "/dev/null"), r"model\.safetensors is not a regular file"),
    "weights-a-fifo": (fifo, r"model\.safetensors is not a regular file"),
    # the shard index against the shards
    "index-wrong-shard": (swap_shards, rf"disagrees with the shards.*places \S+ in {S2}, which does not hold it \(it is in {S1}\)"),
    "index-shard-absent": (lambda ck: (shard_checkpoint(ck), (ck / S2).unlink()), rf"names shard\(s\) that are missing: {S2}"),
    "index-tensor-in-two-shards": (copy_tensor, rf"stored in more than one file: \S+ \(in {S1} and {S2}\)"),
    "index-tensor-unlisted": (edit_index(lambda ck, wm: wm.pop(sorted(wm)[0])), r"holds \S+, which the index does not list"),
    "index-tensor-no-shard-holds": (edit_index(lambda ck, wm: wm.update({"model.extra.weight": S1})),
                                    r"places model\.extra\.weight in .*\(no shard holds it\)"),
    "index-entry-a-number": (edit_index(lambda ck, wm: wm.update({sorted(wm)[0]: 3})), r"weight_map\..* is an integer 3"),
    "index-entry-null": (edit_index(lambda ck, wm: wm.update({sorted(wm)[0]: None})), r"weight_map\..* is null"),
    "index-entry-parent": (edit_index(lambda ck, wm: wm.update({sorted(wm)[0]: "../x.safetensors"})), r"'\.\./x\.safetensors'.*no '\.\.'"),
    "index-entry-absolute": (edit_index(lambda ck, wm: wm.update({sorted(wm)[0]: "/etc/x.safetensors"})), r"no absolute path"),
    "index-entry-nul": (edit_index(lambda ck, wm: wm.update({sorted(wm)[0]: "a\0.safetensors"})), r"expected the name of a \.safetensors file"),
    "index-entry-a-directory": (edit_index(lambda ck, wm: wm.update({sorted(wm)[0]: "sub/"})), r"expected the name of a \.safetensors file"),
    "index-beside-stale-single-file": (lambda ck: (shutil.copy(ck / "model.safetensors", ck.parent / "keep"), shard_checkpoint(ck),
                                                   shutil.copy(ck.parent / "keep", ck / "model.safetensors")),
                                       r"holds both model\.safetensors and the shard index"),
    # the set of weight files
    "unindexed-duplicate-tensor": (lambda ck: copy_tensor(ck, index=False), rf"stored in more than one file: \S+ \(in {S1} and {S2}\)"),
    "weights-empty-file": (lambda ck: (ck / "model.safetensors").write_bytes(b""), r"model\.safetensors is not a safetensors file \(shorter than 8 bytes\)"),
    "unindexed-empty-shard": (lambda ck: (shard_checkpoint(ck, index=False), (ck / "zz.safetensors").write_bytes(b"")), r"zz\.safetensors is not a safetensors file"),
    "index-empty-file": (lambda ck: (shard_checkpoint(ck), (ck / "model.safetensors.index.json").write_bytes(b"")), r"shard index .* is not valid JSON"),
    "weights-a-directory": (dir_named("model.safetensors"), r"model\.safetensors is a directory"),
    "config-a-directory": (dir_named("config.json"), r"config\.json is a directory"),
    "index-a-directory": (lambda ck: (shard_checkpoint(ck), dir_named("model.safetensors.index.json")(ck)), r"shard index .* is a directory"),
    "shard-a-directory": (lambda ck: (shard_checkpoint(ck), (ck / S1).unlink(), (ck / S1).mkdir()), rf"{S1} is a directory"),
}

ACCEPTED = {
    "weights-link-outside-the-directory": outside,
    "weights-link-chain-inside": inside_chain,
    "shards-in-a-subdirectory-and-dotted": subdir_shard,
    "sharded-without-index": lambda ck: shard_checkpoint(ck, index=False),
    "sharded-with-index": shard_checkpoint,
    "stray-loop-beside-the-weights": lambda ck: loop(ck / "notes.json"),
    "unlisted-file-beside-indexed-shards": lambda ck: (shard_checkpoint(ck), shutil.copy(ck / S1, ck / "old.safetensors")),
}


def damaged(source: Path, tmp_path: Path, damage) -> Path:
    ck = tmp_path / "ck"
    shutil.copytree(source, ck)
    damage(ck)
    return ck


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_damaged_directory_is_refused_by_lint(name, source, tmp_path, capsys):
    damage, message = REFUSED[name]
    ck = damaged(source, tmp_path, damage)
    watch = [] if name == "weights-a-fifo" else [ck]  # snapshot() would block reading the pipe
    assert_refused(capsys, ["lint", str(ck)], message, watch)
    with pytest.raises(BughuntError, match=message):
        load_weights(ck)


@pytest.mark.parametrize("name", ["weights-self-loop", "config-self-loop", "index-wrong-shard", "index-tensor-in-two-shards",
                                  "index-tensor-unlisted", "index-beside-stale-single-file"])
def test_damaged_directory_is_refused_by_compare(name, source, tmp_path, capsys):
    damage, message = REFUSED[name]
    ck = damaged(source, tmp_path, damage)
    argv = ["compare", str(ck), "--impl", "reference:fp32", "--impl", "reference", "--in-process", "--tokens", "2,17,99",
            "--out", str(tmp_path / "out")]
    assert_refused(capsys, argv, message, [ck, tmp_path / "out"])


def test_checkpoint_that_is_itself_a_symlink_loop_is_refused(tmp_path, capsys):
    ck = tmp_path / "ck"
    os.symlink("ck", ck)
    assert_refused(capsys, ["compare", str(ck), "--impl", "reference:fp32", "--impl", "reference", "--in-process",
                            "--out", str(tmp_path / "out")], r"ck is a symbolic link loop", [ck])
    assert_refused(capsys, ["lint", str(ck)], r"ck does not exist", [ck])


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_legitimate_directory_loads_the_same_weights(name, source, original, tmp_path, capsys):
    ck = damaged(source, tmp_path, ACCEPTED[name])
    capsys.readouterr()
    assert main(["lint", str(ck)]) == 0, capsys.readouterr().err
    weights = load_weights(ck)
    assert weights.keys() == original.keys()
    for k in original:
        np.testing.assert_array_equal(weights[k], original[k])


# ---- property: bughunt accepts exactly what an independent reader finds consistent --------------------------------

FILES = ["model.safetensors.index.json", S1, S2, S3, "config.json"]
move = st.one_of(
    st.tuples(st.just("self-loop"), st.sampled_from(FILES)),
    st.tuples(st.just("dangling"), st.sampled_from(FILES)),
    st.tuples(st.just("to-directory"), st.sampled_from(FILES)),
    st.tuples(st.just("empty"), st.sampled_from(FILES)),
    st.tuples(st.just("link-outside"), st.sampled_from(FILES)),  # fine: the link resolves to the same bytes
    st.tuples(st.just("delete"), st.sampled_from(FILES)),
    st.tuples(st.just("index-move"), st.integers(0, 200), st.sampled_from([S1, S2, S3, "model-00004-of-00003.safetensors"])),
    st.tuples(st.just("index-drop"), st.integers(0, 200)),
    st.tuples(st.just("index-add"), st.sampled_from([S1, S2, S3])),
    st.tuples(st.just("index-value"), st.integers(0, 200), st.sampled_from([1, None, [], "", "../x.safetensors", "/x.safetensors",
                                                                            "x.bin", "./" + S1, S1 + "/"])),
    st.tuples(st.just("copy-tensor"), st.sampled_from([S1, S2, S3]), st.sampled_from([S1, S2, S3])),
    st.tuples(st.just("stale-single"), st.just(None)),
)


def apply(ck: Path, op: tuple) -> None:
    kind, arg = op[0], op[1]
    path = ck / arg if isinstance(arg, str) else None
    if kind in ("self-loop", "dangling", "to-directory", "empty", "link-outside", "delete") and not os.path.lexists(path):
        return
    if kind == "link-outside" and (path.is_symlink() or not path.is_file()):
        return
    if kind == "self-loop":
        loop(path)
    elif kind == "dangling":
        loop(path, "gone")
    elif kind == "to-directory":
        (ck / "adir").mkdir(exist_ok=True)
        loop(path, "adir")
    elif kind == "empty":
        loop(path)
        path.unlink()
        path.write_bytes(b"")
    elif kind == "link-outside":
        real = Path(tempfile.mkdtemp(dir=ck.parent)) / arg
        shutil.move(path, real)
        os.symlink(real, path)
    elif kind == "delete":
        path.unlink() if path.is_symlink() or not path.is_dir() else shutil.rmtree(path)
    elif kind.startswith("index-"):
        edit_index_file(ck, op)
    elif kind == "copy-tensor" and arg != op[2] and (ck / arg).is_file() and (ck / op[2]).is_file():
        src, dst = read_safetensors(ck / arg), read_safetensors(ck / op[2])
        if src:
            name = sorted(src)[0]
            write_safetensors(ck / op[2], {**dst, name: src[name]})
    elif kind == "stale-single":
        write_safetensors(ck / "model.safetensors", {"model.norm.weight": np.ones(4, np.float32)})


def edit_index_file(ck: Path, op: tuple) -> None:
    index = ck / "model.safetensors.index.json"
    if index.is_symlink() or not index.is_file():
        return
    try:
        doc = json.loads(index.read_text())
        wm = doc["weight_map"]
        names = sorted(wm)
    except (ValueError, KeyError, TypeError):
        return
    if op[0] == "index-move" and names:
        wm[names[op[1] % len(names)]] = op[2]
    elif op[0] == "index-drop" and names:
        del wm[names[op[1] % len(names)]]
    elif op[0] == "index-add":
        wm["model.extra.weight"] = op[1]
    elif op[0] == "index-value" and names:
        wm[names[op[1] % len(names)]] = op[2]
    index.write_text(json.dumps(doc))


def consistent(ck: Path, original: dict) -> bool:
    """Whether the directory holds the original weights once each, by the safetensors package's own reader (shard set
    from the index, else model.safetensors, else every *.safetensors), with an index that agrees with its shards."""
    from safetensors.numpy import load_file

    index = ck / "model.safetensors.index.json"
    try:
        json.loads((ck / "config.json").read_text())
        if os.path.lexists(index):
            if os.path.lexists(ck / "model.safetensors"):
                return False
            wm = json.loads(index.read_text())["weight_map"]
            if not wm or not all(isinstance(v, str) and v.endswith(".safetensors") and ".." not in v.split("/")
                                 and not v.startswith("/") for v in wm.values()):
                return False
            files = sorted(set(os.path.normpath(v) for v in wm.values()))
        elif os.path.lexists(ck / "model.safetensors"):
            files = ["model.safetensors"]
        else:
            files = sorted(p.name for p in ck.glob("*.safetensors"))
        held: dict[str, str] = {}
        for f in files:
            for name, value in load_file(ck / f).items():
                if name in held or not np.array_equal(value, original.get(name, np.zeros(0)), equal_nan=True):
                    return False
                held[name] = f
    except Exception:  # anything the reader cannot read is not consistent
        return False
    stored = set(original) if "lm_head.weight" in held else set(original) - {"lm_head.weight"}  # tied: not stored
    if os.path.lexists(index) and {k: os.path.normpath(v) for k, v in wm.items()} != held:
        return False
    return set(held) == stored


OUTCOMES: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    if OUTCOMES:
        print(f"\nfuzz directory: {OUTCOMES['examples']} examples; consistent and accepted: {OUTCOMES[(True, 0)]}; "
              f"refused: {OUTCOMES[(False, 2)]}; read but reported by lint: {OUTCOMES[(False, 1)]}")


@pytest.mark.slow
@settings(derandomize=True, database=None, max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(sharded=st.booleans(), moves=st.lists(move, min_size=1, max_size=3))
def test_fuzzed_directory_is_accepted_exactly_when_consistent(source, original, capsys, sharded, moves):
    with tempfile.TemporaryDirectory() as d:
        ck = Path(d) / "ck"
        shutil.copytree(source, ck)
        if sharded:
            shard_checkpoint(ck)
        for op in moves:
            apply(ck, op)
        expected = consistent(ck, original)
        before = snapshot([ck])
        capsys.readouterr()
        try:
            code = main(["lint", str(ck)])
        except SystemExit as e:
            code = e.code
        captured = capsys.readouterr()
        text = captured.out + captured.err
        assert "Traceback" not in text, text
        assert snapshot([ck]) == before, "the checkpoint changed"
        OUTCOMES[(expected, code)] += 1
        OUTCOMES["examples"] += 1
        if expected:
            assert code == 0, f"{moves}: a consistent directory was refused: {text[-1500:]}"
            assert load_weights(ck).keys() == original.keys()
        else:
            # 2: refused; 1: lint read the directory but reports the weights it found as errors (missing, misshapen)
            assert code in (1, 2), f"{moves}: exit {code}: {text[-1500:]}"
            assert code == 1 or len(text.split("bughunt: error: ", 1)[-1].strip()) > 20, text
            with pytest.raises(BughuntError):
                load_weights(ck)
