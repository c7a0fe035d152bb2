"""bughunt: find numerics bugs in transformer implementations by comparing them layer by layer against a
float64 reference. The CLI (`bughunt compare`, `bughunt demo`) is a thin layer over this API.

    import bughunt
    result = bughunt.compare("path/to/checkpoint", ["hf", "reference"], dtype="bf16")
    result.first_above_floor("hf")

Heavy libraries (torch, transformers) are imported only by the implementations that need them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from bughunt.errors import BughuntError


def compare(*args, **kwargs):
    """See bughunt.compare.compare."""
    from bughunt.comparison import compare as _compare

    return _compare(*args, **kwargs)


def load_spec(checkpoint):
    from bughunt.spec import load_spec as _load_spec

    return _load_spec(checkpoint)


def tiny_checkpoint(family: str, seed: int = 0):
    """The cached tiny seeded checkpoint of a family (generated on first use)."""
    from bughunt.tiny import tiny_checkpoint as _tiny

    return _tiny(family, seed)


def __getattr__(name):
    lazy = {"Result": "bughunt.result", "Trace": "bughunt.trace", "Spec": "bughunt.spec", "ImplChoice": "bughunt.implementations"}
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(lazy[name]), name)
    raise AttributeError(name)


__all__ = ["BughuntError", "compare", "load_spec", "tiny_checkpoint", "Result", "Trace", "Spec", "ImplChoice", "__version__"]
