"""Multiples of the noise floor are written one way, by bughunt.numbers.multiple, on the terminal, in findings and in the
report; result.json keeps the raw floats."""

import html
import json
import re

import pytest

from bughunt.cli import main
from bughunt.numbers import multiple


@pytest.mark.parametrize("value, text", [
    (6696787.9, "6.7e6x"), (12345.0, "1.2e4x"), (9999.6, "1.0e4x"), (1e300, "1e300x"),
    (9999.4, "9999x"), (123.4, "123x"), (11.4, "11x"), (10.0, "10x"), (9.96, "10x"),
    (3.2, "3.2x"), (3.25, "3.2x"), (0.4, "0.4x"), (0.0431, "0.043x"), (0.001, "0.001x"), (9.96e-4, "0.0010x"),
    (3.14e-4, "3.1e-4x"), (1e-9, "1e-9x"), (-3.2, "-3.2x"),
])
def test_a_multiple_has_two_significant_digits_and_scientific_notation_from_1e4(value, text):
    assert multiple(value) == text


@pytest.mark.parametrize("value, text", [
    (0.0, "0x"), (-0.0, "0x"), (1e-300, "1e-300x"), (1.0, "1x"), (1.0496, "1.0x"), (0.999, "1.0x"), (0.403, "0.40x"),
    (6e6, "6e6x"), (6.02e6, "6.0e6x"), (1.02e-9, "1.0e-9x"),
])
def test_only_an_exact_value_looks_exact(value, text):
    """A zero rounding leaves stays (1.0x is 1.0496); an exact one goes (1x is one); nothing but zero reads 0x."""
    assert multiple(value) == text


def test_none_infinity_and_nan_read_plainly():
    assert multiple(None) == "–" and multiple(float("inf")) == "∞x" and multiple(float("nan")) == "NaN"


def test_compare_writes_multiples_the_same_way_on_the_terminal_in_findings_and_in_the_report(tiny, tmp_path, capsys):
    """A planted bug (RoPE theta 10) far above the fp32 floor and an fp32 emulation near it: the summary's column, the
    divergence finding and the report's per-point cells are numbers.multiple of the raw ratios result.json holds."""
    out = tmp_path / "run"
    code = main(["compare", str(tiny["llama"]), "--impl", "reference:fp32", "--impl", "reference:fp32[rope_theta=10.0]",
                 "--impl", "reference", "--reference", "reference", "--tokens", "2,17,99,5,200,31,7,8", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "result.json").read_text())
    comparisons = {c["candidate"]: c for c in data["comparisons"]}
    buggy, clean = comparisons["reference:fp32[rope_theta=10.0]"], comparisons["reference:fp32"]
    ratios = [p["ratio_to_floor"] for c in (buggy, clean) for p in c["points"] if p.get("ratio_to_floor") is not None]
    assert ratios and all(type(r) is float for r in ratios)  # stored raw, never as text
    assert max(p["ratio_to_floor"] for p in buggy["points"]) > 100 > max(p["ratio_to_floor"] for p in clean["points"])

    assert "max vs floor" in printed
    for c in (buggy, clean):
        worst = multiple(max(p["ratio_to_floor"] for p in c["points"] if p.get("ratio_to_floor") is not None))
        row = next(line for line in printed.splitlines() if line.strip().startswith(c["candidate"] + " "))
        assert f" {worst} " in row, row
    first = next(p for p in buggy["points"] if p["point"] == buggy["first_above_floor"])
    divergence = next(f for f in data["findings"] if f["kind"] == "divergence" and f["implementation"] == buggy["candidate"])
    assert f"is {multiple(first['ratio_to_floor'])} the fp32 noise floor" in divergence["message"]
    assert divergence["message"] in printed

    report = re.sub(r"base64,[A-Za-z0-9+/=]+", "", html.unescape((out / "report.html").read_text()))  # text, not images
    for c in (buggy, clean):
        for p in c["points"]:
            if p.get("ratio_to_floor") is not None:
                assert f"<td>{multiple(p['ratio_to_floor'])}</td>" in report, p["point"]
    long_form = re.compile(r"\d\.\d{3,}x|\d{5,}(\.\d+)?x")  # the old 6696787.9x or a multiple with four decimals
    assert not long_form.search(printed) and not long_form.search(report)
