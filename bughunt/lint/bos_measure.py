"""Which BOS convention the weights were trained with, measured rather than assumed from the family: the loss of the
shipped text (bughunt/data/tiny_corpus.txt, whose first sentence is the default prompt) tokenized as bughunt tokenizes
a prompt (`tokenizer(text)`, bughunt/text.py), once with the BOS the tokenizer gives and once with the other convention
(BOS added, or removed). The forward pass is bughunt's float64 numpy reference (reference_impls/), which depends on no
library under test. Both passes score the same next tokens (every token after the text's first), so the difference is
the cost of the convention alone.

Cost: two passes over MEASURE_TOKENS tokens, stepped side by side so each weight is read and converted once; on the
135M SmolLM2 (256 tokens, 2 busy cores) about 11 s. A model whose passes would exceed MAX_MEASURE_FLOPS or the memory
available is not measured, and the reason is stated.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

MEASURE_TOKENS = 256  # ids fed to the pass with BOS (the other pass gets one fewer)
MIN_MEASURE_TOKENS = 64  # below this the mean loss is too noisy to decide on
# A convention loses "by a clear margin" when its mean loss is this many nats per token higher (perplexity x 1.105).
# Measured: SmolLM2-135M, trained without BOS, 0.040 nats worse with its <|im_start|> BOS; a tiny llama trained 200
# steps with BOS first in every window, 0.38 nats worse without it.
CLEAR_MARGIN = 0.1
# Weights whose better loss is within this many nats of a uniform guess (ln vocab) predict the text no better than
# chance: untrained or broken, so their losses say nothing about a BOS convention.
UNTRAINED_WITHIN = 1.0
# Matmul FLOPs of both passes together: about 10x what SmolLM2-135M needs at 256 tokens (1.4e11, 11 s on 2 cores).
MAX_MEASURE_FLOPS = 1.5e12


@dataclass(frozen=True)
class BosMeasurement:
    bos_token_id: int
    bos_token: str | None
    tokenizer_adds_bos: bool
    loss_with_bos: float  # mean negative log-likelihood, nats per token, of the scored tokens
    loss_without_bos: float
    tokens: int  # next tokens scored in each pass
    standard_error: float  # of the mean per-token difference (tokens are not independent: a rough guide)
    uniform_loss: float  # ln(vocab): a uniform guess
    seconds: float

    @property
    def tokenizer_loss(self) -> float:
        return self.loss_with_bos if self.tokenizer_adds_bos else self.loss_without_bos

    @property
    def other_loss(self) -> float:
        return self.loss_without_bos if self.tokenizer_adds_bos else self.loss_with_bos

    @property
    def margin(self) -> float:
        """How much worse (nats per token) the tokenizer's convention does than the other one; negative: better."""
        return self.tokenizer_loss - self.other_loss

    @property
    def trained(self) -> bool:
        return min(self.loss_with_bos, self.loss_without_bos) < self.uniform_loss - UNTRAINED_WITHIN

    @property
    def prefers(self) -> str | None:
        """'with' or 'without' BOS when one wins by CLEAR_MARGIN on trained weights; None when neither does."""
        d = self.loss_without_bos - self.loss_with_bos
        if not self.trained or abs(d) < CLEAR_MARGIN:
            return None
        return "with" if d > 0 else "without"

    def summary(self) -> str:
        name = f"{self.bos_token!r} (id {self.bos_token_id})" if self.bos_token else f"id {self.bos_token_id}"
        return (f"loss {self.loss_with_bos:.3f} nats/token with BOS, {self.loss_without_bos:.3f} without, over {self.tokens} "
                f"tokens of the shipped text; the tokenizer's convention ({'BOS ' + name if self.tokenizer_adds_bos else 'no BOS'}) "
                f"is {'worse' if self.margin > 0 else 'better'} by {abs(self.margin):.3f} nats/token (clear margin: {CLEAR_MARGIN}; "
                f"float64 reference, {self.seconds:.1f} s)")

    def as_dict(self) -> dict:
        return asdict(self) | {"margin": self.margin, "clear_margin": CLEAR_MARGIN, "prefers": self.prefers}


class _LogitsOnly(dict):
    """Where a reference pass writes its capture points: only the logits are kept."""

    inner = False
    feed = None

    def __setitem__(self, point, value) -> None:
        if point == "logits":
            super().__setitem__(point, value)

    def buffer(self, point: str, shape: tuple[int, ...]) -> np.ndarray:
        a = np.empty(shape)
        super().__setitem__(point, a)
        return a


def measure_text() -> str:
    from bughunt.tiny_tokenizer import CORPUS

    return CORPUS.read_text(encoding="utf-8")


def why_not_measurable(spec, tokens: int) -> str | None:
    """Why the reference cannot measure this checkpoint at `tokens` tokens (family, RoPE, compute, memory), or None."""
    from bughunt import memory
    from bughunt.implementations.reference import ReferenceRunner
    from bughunt.spec import SUPPORTED_ROPE_TYPES, rope_problems

    if spec.family not in ReferenceRunner.families:
        return f"the float64 reference does not implement the {spec.family} family"
    problems = rope_problems(spec) + [f"rope_type {r.type!r} is not implemented" for r in spec.rope.values()
                                      if r.type not in SUPPORTED_ROPE_TYPES]
    if problems:
        return f"the float64 reference cannot compute this config's RoPE ({problems[0]})"
    flops = 2 * memory.forward_flops(spec, tokens)
    if flops > MAX_MEASURE_FLOPS:
        return (f"two float64 passes of {tokens} tokens would take {flops:.2g} matmul FLOPs, over lint's budget of "
                f"{MAX_MEASURE_FLOPS:.2g} (about 10x the 135M SmolLM2's cost)")
    need = memory.estimate("reference", "reference", spec, "fp64", (2, tokens)).peak_bytes + 2 * tokens * spec.vocab_size * 8
    have = memory.available_memory()
    if need > have // 2:
        return f"the float64 passes need about {need / memory.GB:.1f} GB, more than half of the {have / memory.GB:.1f} GB available"
    return None


def measure_bos(checkpoint, spec, tok, bos: int) -> BosMeasurement | str:
    """The two losses, or a sentence saying why they cannot be measured here."""
    from bughunt.checkpoint import load_weights
    from bughunt.errors import BughuntError
    from bughunt.metrics import token_nll
    from reference_impls import Policy, forward_many

    ids = [int(i) for i in tok(measure_text())["input_ids"]]
    adds = bool(ids) and ids[0] == bos
    limit = min(MEASURE_TOKENS, (spec.max_position_embeddings or MEASURE_TOKENS))
    with_bos = (ids if adds else [bos] + ids)[:limit]
    without = with_bos[1:]
    if len(without) < MIN_MEASURE_TOKENS:
        return f"the shipped text is only {len(without)} tokens here (at least {MIN_MEASURE_TOKENS} are needed)"
    if (why := why_not_measurable(spec, len(with_bos))) is not None:
        return why
    try:
        weights = load_weights(checkpoint, spec)
    except BughuntError as e:
        return f"the weights cannot be read ({e})"
    t = time.perf_counter()
    runs = [(spec, np.asarray([seq], dtype=np.int64), Policy(), _LogitsOnly()) for seq in (with_bos, without)]
    outs = forward_many(weights, runs)
    seconds = time.perf_counter() - t
    nll_with = token_nll(outs[0]["logits"], runs[0][1])[0, 1:]  # the next tokens after the text's first
    nll_without = token_nll(outs[1]["logits"], runs[1][1])[0]
    d = nll_with - nll_without
    return BosMeasurement(bos, tok.convert_ids_to_tokens(bos) if bos < len(tok) else None, adds, float(nll_with.mean()),
                          float(nll_without.mean()), int(d.size), float(d.std(ddof=1) / math.sqrt(d.size)),
                          math.log(spec.vocab_size), seconds)
