"""Shared fixtures: tiny seeded checkpoints, generated once per test session into a private cache."""

import os
import tempfile

import numpy as np
import pytest

# A private cache per session, unless the caller chose one (CI and developers may reuse theirs).
os.environ.setdefault("BUGHUNT_CACHE", tempfile.mkdtemp(prefix="bughunt-test-cache-"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bughunt.tiny import TINY_FAMILIES, tiny_checkpoint  # noqa: E402

TOKENS = np.array([[2, 17, 99, 5, 200, 31, 7, 8, 150, 42, 3, 250]], dtype=np.int64)


def per_family(root, build):
    """family -> directory, built by build(family, root / family) on first use, then reused."""
    made = {}

    def get(family):
        if family not in made:
            made[family] = build(family, root / family)
        return made[family]

    return get


@pytest.fixture(scope="session")
def tiny():
    """family -> path of its tiny checkpoint."""
    return {family: tiny_checkpoint(family) for family in TINY_FAMILIES}


@pytest.fixture(scope="session")
def tokens():
    return TOKENS.copy()


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real trained model bughunt ships for its tests (requirements/real.txt): SmolLM2-135M-Instruct, Q4_1 GGUF."""
    from bughunt.sources import real_model

    return real_model()


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """The real model's checkpoint view: a Hugging Face-format directory of its dequantized float32 weights, derived
    from the GGUF once per cache (bughunt/gguf_view.py)."""
    from bughunt.sources import resolve

    return resolve(smollm2_gguf)
