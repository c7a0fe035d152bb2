"""A short, deterministic training run for tiny checkpoints (`bughunt tiny FAMILY --trained`): the seeded model
learns the shipped text (bughunt/data/tiny_corpus.txt) for a few seconds on CPU, so loss on text means something
(negative log-likelihood of the default prompt: gemma2 5.57 -> 2.46 nats, llama 19.3 -> 3.78). 80 steps are too few
for attention sinks: attention mass on the first token and its activation norm stay as in the seeded model.

Deterministic: one thread, torch's deterministic algorithms, batches drawn with numpy from the seed; the same seed
and the same torch version give byte-identical weights. Global torch settings are restored afterwards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bughunt.tiny_tokenizer import CORPUS

STEPS = 80
BATCH = 8
LENGTH = 64
LEARNING_RATE = 3e-3


@dataclass(frozen=True)
class TrainingRecord:
    """What bughunt_tiny.json records about the run."""

    steps: int
    batch: int
    length: int
    learning_rate: float
    corpus_tokens: int
    loss_first: float
    loss_last: float

    def as_dict(self) -> dict:
        return {"corpus": CORPUS.name, **self.__dict__}


@contextlib.contextmanager
def deterministic_torch():
    """One thread and deterministic kernels for the duration; the previous settings come back afterwards."""
    import torch

    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(strict)
        torch.set_num_threads(threads)


def corpus_ids(tokenizer_dir: Path, corpus: Path = CORPUS) -> np.ndarray:
    """The corpus as one stream of ids through the tiny checkpoint's own tokenizer: each paragraph encoded as that
    tokenizer encodes a prompt (BOS first where it adds one), paragraphs joined."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    paragraphs = [p for p in corpus.read_text(encoding="utf-8").split("\n") if p.strip()]
    return np.asarray([i for p in paragraphs for i in tok(p)["input_ids"]], dtype=np.int64)


def train(model, ids: np.ndarray, seed: int, steps: int = STEPS) -> TrainingRecord:
    """Train `model` (a transformers causal LM, float32, on CPU) in place on windows of `ids`; next-token loss."""
    import torch

    rng = np.random.default_rng(seed)
    starts_max = len(ids) - LENGTH - 1
    losses = []
    with deterministic_torch():
        torch.manual_seed(seed)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
        for _ in range(steps):
            starts = rng.integers(0, starts_max, size=BATCH)
            batch = torch.from_numpy(np.stack([ids[s:s + LENGTH] for s in starts]))
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
        model.eval()
    return TrainingRecord(steps, BATCH, LENGTH, LEARNING_RATE, int(len(ids)), round(losses[0], 4), round(losses[-1], 4))
