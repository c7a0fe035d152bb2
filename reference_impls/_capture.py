"""Where a reference forward pass writes its capture points: `Points` keeps them in memory (a bughunt TraceWriter
streams them to disk instead), `layer_input` takes the --isolate feed, and `capture_inner` writes the points inside
a layer only when they were asked for."""

from __future__ import annotations

import numpy as np

from reference_impls._numerics import Numerics


def layer_input(out, i: int, x: np.ndarray, n: Numerics) -> np.ndarray:
    """The input to decoder layer i: this pass's own `x`, or with --isolate (out.feed) the reference's input to that
    layer, rounded to the emulated dtype, so the layer's own error shows without the error it inherits."""
    feed = getattr(out, "feed", None)
    return x if feed is None else n.r(np.asarray(feed(i), dtype=np.float64))


def capture_inner(out, point: str, x: np.ndarray) -> None:
    """Write a point inside the layer (e.g. `layer.0.mlp.hidden`) only when the pass was asked for them."""
    if getattr(out, "inner", False):
        out[point] = x


class Points(dict):
    """Capture points kept in memory: what `forward` writes into when no trace file is given."""

    inner = False
    feed = None

    def buffer(self, point: str, shape: tuple[int, ...]) -> np.ndarray:
        self[point] = np.empty(shape)
        return self[point]
