"""`bughunt demo`'s index: a matrix of checkpoints (the real model first) by implementations, built from the compares'
result.json alone, each run coloured by its largest floor multiple; the real model's section leads the page."""

import json
import math
import re

import pytest

from bughunt import demo
from bughunt.numbers import multiple
from bughunt.result import Result

HOSTILE = "<script>steal()</script>&<b onclick='x()'>"


def _max_from_disk(out, name, label):
    """The largest ratio_to_floor of one candidate, read from that compare's result.json."""
    data = json.loads((out / name / "result.json").read_text())
    c = next(c for c in data["comparisons"] if c["candidate"] == label)
    return max(p["ratio_to_floor"] for p in c["points"] if p.get("ratio_to_floor") is not None)


@pytest.mark.parametrize("value, step", [(None, 7), (float("nan"), 7), (0.0, 0), (0.99, 0), (1.0, 1), (9.9, 1), (10.0, 2),
                                         (999.0, 3), (1e3, 4), (6.7e6, 7), (float("inf"), 7)])
def test_colour_steps_are_decades_of_the_floor_multiple(value, step):
    assert demo.level(value) == step


def test_the_real_model_reads_at_least_256_tokens_of_the_shipped_text(smollm2):
    from bughunt.text import encode_text

    assert encode_text(smollm2, demo.real_text()).tokens.shape[1] >= 256


@pytest.mark.slow
def test_index_matrix_is_built_from_the_results_real_model_first(tmp_path, smollm2):
    out = tmp_path / "demo"
    results = demo.run_demo(out, families=["llama", demo.REAL], implementations=["hf"])
    assert [r.data["checkpoint"]["spec"]["family"] for r in results] == ["llama", "llama"]
    assert results[0].data["checkpoint"]["path"] == str(smollm2)  # the real model ran first, though named second
    assert len(results[0].data["inputs"]["tokens"][0]) >= 256 and results[0].data["generation"]["steps"] == demo.REAL_GENERATE

    rows = [demo.Row(name, name, Result.load(out / name)) for name in (demo.REAL, "llama")]
    table = demo.matrix(rows, ["hf", "keras-jax"])
    assert table["columns"] == ["hf"]  # keras-jax ran nowhere: no column
    assert [r["name"] for r in table["rows"]] == [demo.REAL, "llama"]
    for row in table["rows"]:
        runs = row["cells"]["hf"]
        # the real model at fp32 and bf16; the tiny models at fp32 (demo.TINY_DTYPES)
        assert [r["label"] for r in runs] == (["hf:fp32", "hf:bf16"] if row["name"] == demo.REAL else ["hf:fp32"])
        for run in runs:
            m = _max_from_disk(out, row["name"], run["label"])
            assert run["multiple"] == m and run["level"] == demo.level(m) and run["report"] == f"{row['name']}/report.html"

    page = (out / "index.html").read_text()
    assert page.index(f'href="{demo.REAL}/report.html"') < page.index('href="llama/report.html"')
    cells = re.findall(r'<div class="run m(\d)"><a class="m" href="([^"]+)">(\w+) ([^<]+)</a>', page)
    expected = [(str(r["level"]), r["report"], r["dtype"], multiple(r["multiple"]))
                for row in table["rows"] for r in row["cells"]["hf"]]
    assert cells == expected
    assert "Where the time went" in page and "A real model" in page


def test_index_escapes_what_it_shows_and_marks_failures(tiny, tmp_path):
    from bughunt.comparison import compare

    result = compare(tiny["llama"], ["reference:bf16", "reference"], tokens=[[2, 5, 7, 9]], render=False)
    result.data["implementations"].append({"label": "hf:fp32", "status": "failed", "dtype": "fp32", "error": HOSTILE})
    row = demo.Row("llama", "tiny llama", result, causes={"reference:bf16": {"diagnosis": HOSTILE, "report": "s/report.html"}})
    page = demo.index_page([row], ["hf", "reference"], None, [("total", 1.0)])
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert 'class="run failedrun"' in page and "fp32 failed" in page
    m = demo.max_multiple(result.comparison("reference:bf16"))
    assert math.isfinite(m) and f'<div class="run m{demo.level(m)}"><a class="m" href="llama/report.html">bf16 {multiple(m)}</a>' in page
    assert '<a class="cause" href="s/report.html" title=' in page
