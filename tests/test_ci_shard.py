"""`bughunt ci --shard K/N` and `bughunt ci merge`: the shards of a matrix, merged, give the unsharded run's
summary.md and index.html byte for byte, its JUnit cases (times aside) and its exit code; merge refuses shards
that do not make up one run. Real runs of tiny checkpoints."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from badinput import assert_refused
from bughunt.ci import assign_shards
from bughunt.cli import main

# Two checkpoint-device groups of two cells (so two shards of one group each); one rule fails gemma's bf16 cell, so the summary carries a
# regression's details, and a stray baseline file gives it a stale-baseline line.
MATRIX = """
implementations = ["hf"]
dtypes = ["fp32", "bf16"]
tokens = { length = 8, seed = 0 }

[[checkpoints]]
tiny = "llama"

[[checkpoints]]
tiny = "gemma"

[[thresholds]]
metric = "rel_l2"
baseline_factor = 10
slack = 1e-6

[[thresholds]]
metric = "rel_l2"
cells = "gemma/hf:bf16/*"
points = "layer.*"
max = 1e-9
"""


def junit_cases(path: Path) -> list[str]:
    """Every element of the JUnit file as text, `time` attributes removed (they are measured, so they differ)."""
    root = ET.parse(path).getroot()
    for el in root.iter():
        el.attrib.pop("time", None)
    return [ET.tostring(el, encoding="unicode") for el in root]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The matrix run unsharded, then as 2 shards with progress lines forced on, then merged (named in reverse)."""
    d = tmp_path_factory.mktemp("sharded")
    matrix = d / "m.toml"
    matrix.write_text(MATRIX)
    baselines = d / "baselines"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["ci", str(matrix), "--baseline", str(baselines), "--update-baseline", "--out", str(d / "record")]) == 1
    (baselines / "old__hf-fp32__cpu.json").write_text("{}\n")
    codes = {}
    with contextlib.redirect_stdout(io.StringIO()):
        codes["full"] = main(["ci", str(matrix), "--baseline", str(baselines), "--out", str(d / "full")])
    stderr = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BUGHUNT_PROGRESS", "1")
        for k in (1, 2):
            err = io.StringIO()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                codes[k] = main(["ci", str(matrix), "--baseline", str(baselines), "--shard", f"{k}/2", "--out", str(d / f"shard{k}")])
            stderr[k] = err.getvalue()
    with contextlib.redirect_stdout(io.StringIO()):
        codes["merged"] = main(["ci", "merge", str(d / "shard2"), str(d / "shard1"), "--out", str(d / "merged")])
    return d, matrix, baselines, codes, stderr


@pytest.mark.slow
def test_merged_shards_reproduce_the_unsharded_outputs(sharded):
    d, _, _, codes, _ = sharded
    assert codes["full"] == codes["merged"] == 1
    full, merged = d / "full", d / "merged"
    summary = (full / "summary.md").read_text()
    assert "1 of 4 cells fail" in summary and "`old__hf-fp32__cpu.json`" in summary and "report: reports/gemma-cpu/report.html" in summary
    assert (merged / "summary.md").read_text() == summary
    assert (merged / "index.html").read_text() == (full / "index.html").read_text()
    assert junit_cases(merged / "junit.xml") == junit_cases(full / "junit.xml")
    assert len(ET.parse(merged / "junit.xml").getroot().findall(".//testcase")) == 4
    links = re.findall(r"href='([^']+)'", (merged / "index.html").read_text())
    assert sorted(set(links)) == ["reports/gemma-cpu/report.html", "reports/llama-cpu/report.html"]
    assert all((merged / link).is_file() for link in links)


@pytest.mark.slow
def test_each_shard_runs_whole_groups_and_says_which_shard_it_is(sharded):
    d, _, _, codes, stderr = sharded
    assert (codes[1], codes[2]) == (0, 1)  # only shard 2 holds the failing gemma cell
    for k, group in ((1, "llama-cpu"), (2, "gemma-cpu")):
        out = d / f"shard{k}"
        assert [p.name for p in (out / "reports").iterdir()] == [group]
        assert (out / "summary.md").read_text().startswith(f"## bughunt ci, shard {k} of 2:")
        doc = json.loads((out / "shard.json").read_text())
        assert doc["shard"] == {"index": k, "count": 2} and len(doc["outcomes"]) == 2
        assert "bughunt ci" in stderr[k] and "2/2" in stderr[k] and "cell" in stderr[k]  # the forced progress line


def test_shards_are_contiguous_balanced_whole_groups():
    assert assign_shards([2, 2, 2], 3) == [1, 2, 3]
    assert assign_shards([2] * 8, 4) == [1, 1, 2, 2, 3, 3, 4, 4]
    assert assign_shards([16], 4) == [3]  # one group: it cannot split, the other shards run nothing
    assert assign_shards([5, 1, 1, 1, 1, 1], 2) == [1, 2, 2, 2, 2, 2]
    for sizes in ([3, 1, 4, 1, 5, 9, 2, 6], [1] * 13, [7, 7, 1, 1, 1, 1, 1, 1, 1, 1]):
        for n in range(1, 12):
            owner = assign_shards(sizes, n)
            assert owner == sorted(owner) and all(1 <= k <= n for k in owner), (sizes, n)
            loads = [sum(s for s, k in zip(sizes, owner) if k == shard) for shard in range(1, n + 1)]
            assert max(loads) <= sum(sizes) / n + max(sizes), (sizes, n, loads)


@pytest.mark.parametrize("shard, message", [
    ("0/5", r"--shard 0/5: K must be between 1 and N"),
    ("5/4", r"--shard 5/4: K must be between 1 and N"),
    ("1/0", r"--shard 1/0: K must be between 1 and N"),
    ("two/4", r"--shard 'two/4' is not K/N"),
    ("3", r"--shard '3' is not K/N"),
])
@pytest.mark.slow
def test_bad_shard_spec_is_refused_before_anything_runs(sharded, capsys, tmp_path, shard, message):
    _, matrix, baselines, _, _ = sharded
    out = tmp_path / "out"
    assert_refused(capsys, ["ci", str(matrix), "--baseline", str(baselines), "--shard", shard, "--out", str(out)], message,
                   watch=[out, baselines])


def edited(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    doc = json.loads((dst / "shard.json").read_text())
    change(doc)
    (dst / "shard.json").write_text(json.dumps(doc))
    return dst


@pytest.mark.slow
def test_merge_refuses_shards_that_are_not_one_run(sharded, capsys, tmp_path):
    d, matrix, baselines, _, _ = sharded
    s1, s2 = d / "shard1", d / "shard2"
    out = tmp_path / "merged"

    def refused(dirs, message):
        assert_refused(capsys, ["ci", "merge", *map(str, dirs), "--out", str(out)], message, watch=[out, s1, s2])

    refused([s1], r"shard 2 of 2 is missing: got 1 of 2. Pass every shard's directory")
    refused([s1, s1, s2], r"shard1 and .*shard1 are both shard 1 of 2")
    refused([s1, s2, tmp_path], r"has no shard.json")
    refused([s1, tmp_path / "absent"], r"absent is not a directory")

    # Shard 3 of 4 of the same matrix runs nothing (its 2 groups go to shards 2 and 4), so it is cheap: another N.
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["ci", str(matrix), "--baseline", str(baselines), "--shard", "3/4", "--out", str(tmp_path / "three")]) == 0
    assert "no cells" in (tmp_path / "three" / "summary.md").read_text()
    refused([s1, tmp_path / "three"], r"is shard 1 of 2 but .*three is shard 3 of 4")

    # Shard 1 of 2 of another matrix (only the first checkpoint, which goes to shard 2, so shard 1 is empty again).
    other = tmp_path / "other" / "m.toml"
    other.parent.mkdir()
    other.write_text(MATRIX.replace('[[checkpoints]]\ntiny = "gemma"\n', "").replace("gemma/hf:bf16/*", "*/hf:bf16/*"))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["ci", str(other), "--baseline", str(baselines), "--shard", "1/2", "--out", str(tmp_path / "o1")]) == 0
    refused([tmp_path / "o1", s2], r"are shards of different runs: their matrix files differ")

    bad = edited(s2, tmp_path / "badstatus", lambda doc: doc["outcomes"][0].update(status="maybe"))
    refused([s1, bad], r"not a valid bughunt shard document: outcomes.0.status: Input should be 'pass', 'fail', 'error' or 'skipped'")
    bad = edited(s2, tmp_path / "badtype", lambda doc: doc["shard"].update(index="2"))
    refused([s1, bad], r"not a valid bughunt shard document: shard.index: Input should be a valid integer")
    bad = edited(s2, tmp_path / "range", lambda doc: doc["shard"].update(index=3))
    refused([s1, bad], r"shard 3 of 2 is out of range")
    bad = edited(s2, tmp_path / "dropped", lambda doc: doc["outcomes"].pop())
    refused([s1, bad], r"shard 2 of 2 should hold cells .* but holds")
    bad = edited(s2, tmp_path / "escape", lambda doc: doc["outcomes"][0].update(report="reports/../../x/report.html"))
    refused([s1, bad], r"report path .* is not reports/<group>/<file>")
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "shard.json").write_text("{not json")
    refused([s1, tmp_path / "garbled"], r"not a valid bughunt shard document: the document: Invalid JSON")
    noreport = tmp_path / "noreport"
    shutil.copytree(s2, noreport)
    shutil.rmtree(noreport / "reports")
    refused([s1, noreport], r"lacks reports/gemma-cpu/report.html")
    assert_refused(capsys, ["ci", "merge", str(s1), str(s2), "--out", str(s2)], r"--out .* is one of the shard directories",
                   watch=[s1, s2])


@pytest.mark.slow
def test_a_matrix_file_named_merge_runs_as_dot_slash_merge(sharded, capsys, tmp_path, monkeypatch):
    _, matrix, baselines, _, _ = sharded
    monkeypatch.chdir(tmp_path)
    shutil.copy(matrix, tmp_path / "merge")
    assert_refused(capsys, ["ci", "merge", "--baseline", str(baselines)], r"To run a matrix file named merge, write `bughunt ci ./merge")
    assert main(["ci", "./merge", "--baseline", str(baselines), "--shard", "1/4", "--out", "out"]) == 0  # an empty shard: quick
    assert json.loads((tmp_path / "out" / "shard.json").read_text())["run"]["source"] == "merge"
