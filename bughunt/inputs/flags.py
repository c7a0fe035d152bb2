"""Numeric command-line settings shared by the experiments (--floor-factor, --timeout): finite and positive."""

from __future__ import annotations

import math

from bughunt.errors import BughuntError


def positive(value: float | None, flag: str, meaning: str) -> None:
    """Refuse a setting that is not a finite positive number (None means "not set" and passes)."""
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise BughuntError(f"{flag} must be a finite positive number ({meaning}), got {value}.")
