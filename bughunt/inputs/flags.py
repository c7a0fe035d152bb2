"""Numeric command-line settings shared by the experiments (--floor-factor, --timeout): finite and positive."""

from __future__ import annotations

import math

from bughunt.errors import BughuntError


def positive(value: float | None, flag: str, meaning: str) -> None:
    """Refuse a setting that is not a finite positive number (None means "not set" and passes)."""
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise BughuntError(f"{flag} must be a finite positive number ({meaning}), got {value}.")


def key_values(items: list[str] | None, flag: str) -> dict:
    """Repeated KEY=VALUE flags (--decode-config) -> {key: int, float or str}."""
    config = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise BughuntError(f"{flag} '{item}' must be KEY=VALUE, e.g. sliding_window=4095.")
        for kind in (int, float):
            try:
                config[key] = kind(value)
                break
            except ValueError:
                continue
        else:
            config[key] = value
    return config


def choice_of(allowed, name: str):
    """A string type for an options model (pydantic) that takes one of `allowed`, refused as `one_of` words it."""
    from typing import Annotated

    from pydantic import AfterValidator

    return Annotated[str, AfterValidator(lambda v: one_of(v, allowed, name))]


def one_of(value, allowed, name: str):
    """`value` when it is one of `allowed`; else a ValueError naming the setting and the allowed values (the options
    models' validators raise it, and `plan.validated` turns it into the BughuntError a user reads)."""
    if value not in allowed:
        raise ValueError(f"unknown {name} '{value}'. Use one of: {', '.join(allowed)}.")
    return value
