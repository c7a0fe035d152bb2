"""The runner life cycle every implementation shares: open, run, close."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np

from bughunt.errors import BughuntError
from bughunt.spec import Spec
from bughunt.trace import Trace, TraceWriter
from bughunt import points as P


class Runner:
    name = "base"
    families: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ()
    devices: tuple[str, ...] = ("cpu",)
    # toggle name -> None if applied, or the reason it cannot be (see toggles.py for what each means)
    toggle_support: dict[str, str | None] = {"bos": None}

    def __init__(self, checkpoint: Path, spec: Spec, dtype: str, device: str = "cpu", branches: bool = True,
                 label: str | None = None, allow_pickle: bool = False, toggles: dict[str, str] | None = None):
        if spec.family not in self.families:
            raise BughuntError(f"implementation '{self.name}' does not support family '{spec.family}' (supports: {', '.join(self.families)}).")
        if dtype not in self.dtypes:
            raise BughuntError(f"implementation '{self.name}' cannot run at {dtype} (supports: {', '.join(self.dtypes)}).")
        if device not in self.devices:
            raise BughuntError(f"implementation '{self.name}' cannot run on {device} (supports: {', '.join(self.devices)}).")
        self.checkpoint, self.spec, self.dtype, self.device = Path(checkpoint), spec, dtype, device
        self.branches, self.allow_pickle = branches, allow_pickle
        self.label = label or self.name
        self.toggles = self._parse_toggles(toggles)
        self.load_seconds = 0.0
        self.is_open = False
        # what the library cannot represent of this checkpoint, run anyway with the library's own value (one phrase each:
        # "the library fixes rms_norm_eps at 1e-06; the checkpoint says 0.01"); reported next to the measured divergence
        self.cannot_represent: list[str] = []

    # toggles an open runner can switch without loading again (the rest change how the model is built)
    live_toggles: frozenset[str] = frozenset({"bos"})

    # what the memory plan counts for it (bughunt/memory.py): the resident cost of its library once imported and its model
    # objects built (measured on the tiny checkpoints: a bare `import torch, transformers` is ~0.5 GB of RSS; JAX with
    # Flax or Keras ~0.8 GB), whether it holds one layer's weights at a time, and whether it converts the weights from a
    # float32 copy
    library_gb = 1.0
    streams_layers = False
    converts_from_fp32 = False

    @classmethod
    def native_dtype(cls, checkpoint) -> str | None:
        """The dtype it runs at when none is named, where the checkpoint itself decides (a GGUF file's type), else None."""
        return None

    # how to install its stack; None: `pip install` of the modules it misses (bughunt implementations prints it)
    install_hint: str | None = None

    # its own tokenizer path, in words (None: it has none); `own_tokenizer` runs it (bughunt/probes/tokenizer_path.py)
    tokenizer_path: str | None = None

    @classmethod
    def own_tokenizer(cls, checkpoint: Path, text: dict) -> dict:
        """{"path": what ran, "rows": [ids per row]}: the ids this library's own tokenizer path gives for `text`."""
        raise BughuntError(f"implementation {cls.name} has no tokenizer path of its own")

    # whether it spreads the model over devices and disk with `device_map="auto"` (--device-map; accelerate)
    supports_device_map = False

    # whether the runner applies the ignored-field hypotheses `field:<path>` (bughunt/hypotheses.py)
    applies_field_hypotheses = False

    @classmethod
    def cannot_apply(cls, name: str) -> str | None:
        """None when this runner applies toggle `name`, otherwise why it cannot."""
        from bughunt.toggles import is_field

        if is_field(name):
            return None if cls.applies_field_hypotheses else "it reads its config its own way; field hypotheses go on the reference"
        return cls.toggle_support.get(name, "not implemented for this runner")

    def _parse_toggles(self, toggles: dict[str, str] | None) -> dict[str, str]:
        from bughunt.toggles import changed, lookup, parse_toggles

        parsed = parse_toggles(toggles or {}, self.spec)
        for name in parsed:
            if not lookup(name, self.spec).applies(self.spec):
                raise BughuntError(f"toggle {name} does not apply to family {self.spec.family} (nothing in its config or architecture uses it).")
        for name in changed(self.spec, parsed):
            reason = self.cannot_apply(name)
            if reason is not None:
                raise BughuntError(f"implementation '{self.name}' cannot apply toggle {name}={parsed[name]}: {reason}.")
        return parsed

    def retoggle(self, toggles: dict[str, str] | None) -> bool:
        """Switch an open runner to other toggle values without loading again. Returns False (and changes nothing)
        when a toggle that is not live differs: the caller must open a new runner."""
        new = self._parse_toggles(toggles)
        moved = {k for k in set(new) | set(self.toggles) if new.get(k) != self.toggles.get(k)}
        if not moved <= self.live_toggles:
            return False
        self._switch_toggles(new)
        self.toggles = new
        return True

    def _switch_toggles(self, new: dict[str, str]) -> None:
        """Undo the live toggles applied to the open model and apply `new` (bos needs nothing: it acts on the ids)."""

    # -- life cycle ---------------------------------------------------------------------------
    def open(self) -> "Runner":
        t = time.perf_counter()
        self._open()
        self.load_seconds = time.perf_counter() - t
        self.is_open = True
        return self

    # the dtype this runner's trace stores its arrays in
    trace_dtype = np.float32

    # whether the runner can capture the points inside each layer (attn.q/k/scores/probs/out, mlp.hidden), and feed
    # each decoder layer an input given from outside (--isolate)
    captures_inner = False
    accepts_feed = False

    def run(self, tokens: np.ndarray, stem: Path | None = None, inner: bool = False, feed: Trace | None = None) -> Trace:
        """One forward pass. With `stem`, each capture point is written to `<stem>.safetensors` as it is captured and
        the returned trace is memory-mapped from there; without, the trace is held in memory. With `inner`, runners
        that can also capture the points inside each layer. With `feed` (a reference trace of the same tokens), each
        decoder layer i takes the feed's input to that layer (`embed` for layer 0, `layer.{i-1}` after) instead of the
        previous layer's output: each layer's own error, without the error it inherits (--isolate)."""
        tokens, out = self.prepare(tokens, stem)
        out.inner = inner and self.captures_inner
        if feed is not None:
            out.feed = self.feeder(feed, tokens)
        t = time.perf_counter()
        try:
            arrays = self._run(tokens, out)
            for name, array in (arrays or {}).items():  # runners that return their points instead of streaming them
                if name not in out:
                    out[name] = array
        except BaseException:
            out.abort()
            raise
        return self.finish(out, tokens, time.perf_counter() - t)

    def prepare(self, tokens: np.ndarray, stem: Path | None) -> tuple[np.ndarray, TraceWriter]:
        """The ids this runner feeds (after its toggles, e.g. bos) and the writer its capture points go to."""
        if not self.is_open:
            raise RuntimeError("call open() before run()")
        from bughunt.toggles import apply_to_tokens

        tokens = apply_to_tokens(np.atleast_2d(np.asarray(tokens, dtype=np.int64)), self.spec, self.toggles)
        if tokens.size == 0:
            raise BughuntError("no input tokens: pass at least one token id.")
        if tokens.min() < 0 or tokens.max() >= self.spec.vocab_size:
            raise BughuntError(f"token ids must lie in [0, {self.spec.vocab_size}) for this checkpoint; got range [{tokens.min()}, {tokens.max()}].")
        expected = 3 + self.spec.num_layers * 3
        keep = None if self.branches else (lambda p: not P.is_branch_output(p))
        return tokens, TraceWriter(stem, expected, self.trace_dtype, keep)

    def feeder(self, feed: Trace, tokens: np.ndarray):
        """layer index -> the feed trace's input to that layer, checked against this run's input shape."""
        if not self.accepts_feed:
            raise BughuntError(f"implementation '{self.name}' cannot feed a layer an input from outside (--isolate): its library "
                               "offers no seam to replace a decoder layer's input.")
        shape = feed.arrays["embed"].shape
        if tuple(shape[:2]) != tuple(tokens.shape):
            raise BughuntError(f"--isolate: the reference's trace holds {list(shape[:2])} positions but {self.label} runs "
                               f"{list(tokens.shape)} (a bos toggle on one side only?); isolate with the same input on both sides.")
        return lambda i: feed.arrays["embed" if i == 0 else P.layer(i - 1)]

    def finish(self, out: TraceWriter, tokens: np.ndarray, seconds: float, **timings: float) -> Trace:
        meta = {"implementation": self.name, "dtype": self.dtype, "device": self.device, "versions": self.versions(),
                "timings": {"load_s": self.load_seconds, "forward_s": seconds, **timings}, "tokens_shape": list(tokens.shape),
                "toggles": dict(self.toggles)}
        if self.cannot_represent:
            meta["cannot_represent"] = list(self.cannot_represent)
        return out.finish(self.label, meta)

    def generate(self, tokens: np.ndarray, steps: int, decode_config: dict | None = None):
        """Greedy generation of `steps` tokens after each row of `tokens` through this implementation's own path
        (a bughunt.generation.Generation). The default, for implementations without one (the reference), recomputes the
        whole prefix each step: exactly what a KV cache must reproduce."""
        import shutil
        import tempfile

        from bughunt.generation import Generation, recompute

        if decode_config:
            raise BughuntError(f"{self.label} generates by recomputing the prefix, so a decode-only config change means nothing for it.")
        scratch = tempfile.mkdtemp(prefix="bughunt-generate-")
        count = [0]

        def last_logits(ids: np.ndarray) -> np.ndarray:
            count[0] += 1
            trace = self.run(ids, Path(scratch) / f"step{count[0]}")  # streams to disk: memory stays one trace's worth
            last = np.array(trace.arrays["logits"][:, -1:], dtype=np.float64)
            del trace
            return last

        try:
            ids, logits = recompute(last_logits, tokens, steps)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return Generation(self.label, ids, logits, "greedy by recomputing the whole prefix each step", "the same forward passes")

    def close(self) -> None:
        self._close()
        self.is_open = False

    def __enter__(self) -> "Runner":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what each implementation provides ----------------------------------------------------
    def _open(self) -> None:
        raise NotImplementedError

    def _run(self, tokens: np.ndarray, out: TraceWriter) -> dict[str, np.ndarray] | None:
        """Run the forward pass, putting each capture point into `out` (`out[point] = array`) as soon as it exists;
        a runner may instead return all its points as a dict."""
        raise NotImplementedError

    def _close(self) -> None:
        pass

    # -- the weight check (bughunt/weightcheck.py) ----------------------------------------------
    # Whether `loaded_weights` is implemented: the runner can show the parameters its library holds.
    exposes_weights = False

    def loaded_weights(self) -> Iterator[tuple[str, np.ndarray]]:
        """The parameters the open model holds, one at a time, as (checkpoint tensor name, array in the checkpoint's
        orientation). The runner undoes only its library's documented layout transform (a keras EinsumDense kernel
        back to HF's [out, in], the DeepMind tree's [heads, D, head_dim] back to [heads * head_dim, D]); the values are
        what the library holds, at its dtype (bf16 may come back as float32, which holds it exactly), so a conversion
        that rounds, transposes, permutes or offsets a tensor shows against the checkpoint. A parameter the library
        holds that has no checkpoint tensor is yielded under the name the checkpoint would give it."""
        raise BughuntError(f"implementation '{self.name}' does not expose its loaded parameters.")

    def versions(self) -> dict[str, str]:
        return {}


def decoder_points(base, spec: Spec, branches: bool) -> dict[str, tuple[object, str]]:
    """capture point -> (module, kind) for a decoder laid out with transformers' names (`base.layers`, `base.norm`,
    each layer's `self_attn` and `mlp`, and Gemma 2/3's post-branch norms), which mlx-lm's models share; kind is 'pre'
    (the module's input) or 'out' (its output)."""
    layers = base.layers
    points: dict[str, tuple[object, str]] = {"embed": (layers[0], "pre")}
    for i, layer in enumerate(layers):
        if branches:
            if spec.sandwich_norms:  # the branch output is the post-branch norm's output
                points[P.branch(i, "attn")] = (layer.post_attention_layernorm, "out")
                points[P.branch(i, "mlp")] = (layer.post_feedforward_layernorm, "out")
            else:
                points[P.branch(i, "attn")] = (layer.self_attn, "out")
                points[P.branch(i, "mlp")] = (layer.mlp, "out")
        points[P.layer(i)] = (layer, "out")
    points["final_norm"] = (base.norm, "out")
    return points
