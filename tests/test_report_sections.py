"""The report's sections: markup lives in bughunt/templates/ and result.json holds plain data; every string a result
carries is escaped; a schema_version 1 result (decode's section stored as HTML) still renders, once and sanitized."""

from __future__ import annotations

import copy
import html
import inspect
import json
import re
from pathlib import Path

import pytest

from bughunt import report
from bughunt.result import SCHEMA_VERSION, Result

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = "<script>steal()</script>&<b onclick='x()'>"


def _result(**extra) -> dict:
    """A small, schema-valid result with no comparisons (as decode writes), extended by `extra`."""
    data = {
        "schema": "bughunt.result", "schema_version": SCHEMA_VERSION, "kind": "decode", "created": "2025-01-01T00:00:00+00:00",
        "command": "bughunt decode ck", "checkpoint": {"path": "/ck", "spec": {"family": "llama", "num_layers": 2, "hidden_size": 8}},
        "inputs": {"tokens": [[2, 17, 99, 5]]}, "settings": {"dtype": "fp32", "device": "cpu", "reference": "reference", "floor_factor": 10.0},
        "environment": {"python": "3.12", "packages": {}},
        "implementations": [{"label": "hf", "name": "hf", "dtype": "fp32", "device": "cpu", "status": "ok", "error": None, "meta": {}}],
        "noise_floor": {}, "comparisons": [], "findings": [],
    }
    data.update(extra)
    return data


def _decode(label: str = "hf") -> dict:
    return {"candidate": label, "prefill": 2, "path": "kv-cache", "decode_config": {"k": HOSTILE}, "steps": [0, 1, 2, 3],
            "self": {"rel_l2": [0.0, 0.0, 1.5e-7, None], "first_departing_step": None},
            "reference": {"label": "ref" + HOSTILE, "path": "prefix recomputation", "rel_l2": [0.0, 0.0, 2e-7, 3e-7], "first_departing_step": 3}}


def _search(**extra) -> dict:
    s = {"diagnosis": "d" + HOSTILE, "at_floor": False, "method": "greedy forward selection", "evaluated": 3, "space_size": 40,
         "baseline_fit": 2.5, "best_fit": 0.2, "best": {"gelu": "exact"},
         "explanations": [{"toggle": "gelu", "value": "exact", "description": "exact" + HOSTILE,
                           "spellings": [{"gelu": "exact"}, {"field:hidden_act": HOSTILE}]}],
         "ablation": [{"toggle": "gelu", "value": "exact", "delta": 2.3, "first_above_floor_without": None}]}
    s.update(extra)
    return s


def _sweep(search: dict | None) -> dict:
    curve = {"embed": None, "layer.0": -4.5, "layer.1": -4.0}
    rel = {"layer.0": 1e-5, "layer.1": 2e-5}
    return {"mode": "search", "side": "reference", "candidate": "hf" + HOSTILE, "reference": "reference", "search": search,
            "configurations": [{"label": "{gelu=exact}", "toggles": {"gelu": "exact"}, "score": 0.3, "first_above_floor": None, "curve": curve, "rel_l2": rel},
                               {"label": "{}", "toggles": {}, "score": 2.5, "first_above_floor": "layer.0" + HOSTILE,
                                "curve": {**curve, "layer.0": -2.0}, "rel_l2": {"layer.0": 1e-2, "layer.1": 2e-5}}]}


def _generation() -> dict:
    ref = {"label": "reference", "path": "recomputation", "tokens": [[5, 6, 7]], "margins": [[0.5, 0.01, 2.0]]}
    differs = {"first_diff": 1, "step": 1, "candidate_token": 9, "reference_token": 6, "candidate_rank_under_reference": 1,
               "reference_rank_under_candidate": 0, "reference_gap": 0.0123, "candidate_gap": 0.5, "reference_margin": 0.01, "topk_ok": True}
    cand = {"candidate": "hf" + HOSTILE, "path": "generate", "logits_source": "its logits" + HOSTILE, "tokens": [[5, 9, 7]],
            "rows": [differs], "first_diff": 1, "matched_steps": 1, "topk_ok": 1.0}
    return {"steps": 3, "top_k": 5, "prompt_length": 4, "decode_config": {}, "reference": ref, "candidates": [cand],
            "failed": {"keras" + HOSTILE: "boom" + HOSTILE}}


def _text(page: str) -> str:
    """The page as a reader sees it: tags dropped, entities decoded, white space collapsed."""
    return re.sub(r" ([,.;)])", r"\1", re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page))))


def test_no_markup_is_built_in_python():
    """HTML lives in templates: the modules that prepare the report's data build no tags (ci/outputs.py's Markdown
    summary keeps GitHub's <details> fold, which is Markdown, so it is checked for its HTML index alone)."""
    from bughunt.ci import outputs

    assert not re.search(r"<(p|tr|td|th|table|div|b|details|h\d)[ >]", inspect.getsource(outputs.index_html))
    names = ["bughunt/report.py", "bughunt/plots.py", "bughunt/decode.py", "bughunt/demo.py", "bughunt/ci/run.py",
             "bughunt/lint/run.py"] + [f"bughunt/probes/{p.name}" for p in (ROOT / "bughunt/probes").glob("*.py")]
    for name in names:
        source = (ROOT / name).read_text()
        assert not re.search(r"<(p|tr|td|th|table|div|b|details|h\d)[ >]", source), name


def test_every_string_a_result_carries_is_escaped_in_every_section():
    data = _result(decode=_decode("hf" + HOSTILE), sweep=_sweep(_search()), generation=_generation())
    data["implementations"][0]["meta"]["weight_check"] = {
        "implementation": "hf", "counts": {"identical": 3, "differs": 1}, "summary": "1 differs" + HOSTILE,
        "rows": [{"name": "w" + HOSTILE, "relation": "differs", "max_abs": 0.5, "max_rel": None, "detail": HOSTILE}]}
    page = report.render_html(Result(data), {"decode": b"png"})
    assert "<script>steal" not in page and "<b onclick" not in page
    for title in ("Greedy generation", "Sweep", "Decode consistency", "Weights"):
        assert page.count(f"<h2>{title}</h2>") == 1, title
    # the experiment's own sections first, then the probes' (bughunt/probes), in their registration order
    assert page.index("<h2>Sweep</h2>") < page.index("<h2>Decode consistency</h2>") < page.index("<h2>Weights</h2>")
    assert page.index("<h2>Weights</h2>") < page.index("<h2>Greedy generation</h2>")
    text = _text(page)
    assert f"hf{HOSTILE} decodes through its kv-cache path after a prefill of 2 tokens" in text
    assert "own full pass None, reference 3 (above 10x the logits floor)" in text
    assert "2 1.50e-07 2.00e-07 3 – 3.00e-07" in text  # a missing value shows as a dash
    assert f"{{gelu=exact}} = {{field:hidden_act={HOSTILE}}}" in text  # spellings of one explanation
    assert "▶ {gelu=exact} (chosen)" in text and f"none –" in text
    assert "identical: 3" in text and "differs: 1" in text and f"keras{HOSTILE} could not generate: boom{HOSTILE}" in text


def test_generation_marks_the_steps_that_differ_from_the_reference():
    from bughunt.probes.generate import generation_view

    view = generation_view(_generation())
    assert [[c["differs"] for c in row["tokens"]] for row in view["token_rows"]] == [[False, False, False], [False, True, False]]
    page = report.render_template("sections/generation.html", data=view)
    assert page.count("background:#ffd6d2") == 1 and "<td>0.01</td>" in page and "<td>0.0123 / 0.5</td>" in page


@pytest.mark.parametrize("extra", [
    {},
    {"screening": [{"layers": 1, "screened": 30, "confirmed": 1}], "screened": 30, "passes": {"full": 3, "screening": 30}},
    {"screening": [{"layers": 2}, {"layers": 1}, {"layers": 2}], "screened": 12},
    {"screening": [], "passes": {}},
])
def test_the_report_counts_a_search_in_the_terminal_s_words(extra):
    """The sweep template words what a search ran as sweep.search_counts does on the terminal."""
    from bughunt.sweep import search_counts

    search = _search(**extra)
    page = report.render_template("sections/sweep.html", data=report.sweep_view(_sweep(search)))
    assert f"search: {search_counts(search)}; fit 2.50 as is, 0.20 with the best settings" in _text(page)


def test_a_schema_1_decode_result_renders_its_decode_section_once_and_sanitized(tmp_path):
    """Before schema_version 2 decode stored its section as HTML in extra_sections; `bughunt render` of such a file
    draws the section from its data (the stored copy is dropped) and still sanitizes any other stored section."""
    from bughunt.cli import main

    old = _result(decode=_decode())
    old["schema_version"] = 1
    old["extra_sections"] = [{"title": "Decode consistency", "html": "<p>stored copy</p><script>steal()</script>"},
                             {"title": "CI gate", "html": "<table><tr><td onclick='x()'>cell</td></tr></table><script>s()</script>"}]
    (tmp_path / "result.json").write_text(json.dumps(old))
    assert main(["render", str(tmp_path / "result.json"), "--out", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("<h2>Decode consistency</h2>") == 1 and "stored copy" not in page
    assert "decodes through its kv-cache path" in page and "<td>cell</td>" in page
    assert "<script>" not in page and "<td onclick" not in page

    new = copy.deepcopy(old)
    new["schema_version"] = SCHEMA_VERSION
    del new["extra_sections"][0]
    assert report.render_html(Result(new), {}) == report.render_html(Result(old), {})


def test_decode_stores_data_not_markup(tiny, tmp_path):
    from bughunt.decode import decode_check

    decode_check(tiny["llama"], impl="hf", reference="reference", tokens=[[2, 17, 99, 5, 8]], prefill=2, out=tmp_path / "d")
    data = json.loads((tmp_path / "d" / "result.json").read_text())
    assert data["schema_version"] == SCHEMA_VERSION and "extra_sections" not in data and data["decode"]["prefill"] == 2
    assert (tmp_path / "d" / "report.html").read_text().count("<h2>Decode consistency</h2>") == 1
