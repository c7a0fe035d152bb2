"""How a multiple (a divergence over its noise floor, a value over its baseline) is written for people: `6.7e6x`,
`11x`, `3.2x`, `0.4x`. One function, used by the terminal summary, the findings' messages and the HTML report;
result.json keeps the raw floats."""

from __future__ import annotations

import math


def multiple(r: float | None) -> str:
    """`r` as a multiple, two significant digits: `3.1e-4x` below 1e-3, `0.043x`, `0.4x`, `3.2x` below 10, whole numbers
    (`11x`, `4567x`) below 1e4 and `6.7e6x` from 1e4 up. A zero that rounding leaves is kept and one that is exact is
    not, so only an exact value looks exact: `0x` is exactly zero, `1x` exactly one, `1.0x` is 1.0496. `–` for None,
    `∞x` for infinity, `NaN` for NaN."""
    if r is None:
        return "–"
    r = float(r)
    if math.isnan(r):
        return "NaN"
    if math.isinf(r):
        return ("-" if r < 0 else "") + "∞x"
    if r == 0:
        return "0x"
    shown = float(format(abs(r), ".2g"))  # the thresholds apply to what is printed: 9.96e-4 reads 0.001x, not 1e-3x
    if shown < 1e-3:
        return _scientific(r) + "x"
    if shown < 10:
        return _honest(format(r, ".2g"), format(r, "#.2g"), r) + "x"
    if round(abs(r)) < 1e4:
        return f"{round(r)}x"
    return _scientific(r) + "x"


def _scientific(r: float) -> str:
    """`6.7e6`, `6e6` (exactly), `6.0e6` (rounded), `3.1e-4`: two significant digits, no plus sign, no padded exponent."""
    mantissa, exponent = f"{r:.1e}".split("e")
    short = mantissa.removesuffix(".0")
    return _honest(f"{short}e{int(exponent)}", f"{mantissa}e{int(exponent)}", r)


def _honest(short: str, padded: str, r: float) -> str:
    """`short` (trailing zeros dropped) when it is exactly `r`, else `padded` (they stay, as the digits they are)."""
    return short if float(short) == r else padded
