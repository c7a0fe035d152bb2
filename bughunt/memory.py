"""Memory planning for a run: estimate each implementation's peak resident memory from the checkpoint's size, the
dtype and the token count, decide which implementations may run side by side and which one after another, and
refuse before anything starts a run that cannot fit (saying what would). Being killed by the kernel is never the
answer.

The estimates are deliberately simple formulas, stated once here, and printed in the report so a user can see
why a run was scheduled the way it was. They are upper-bound-leaning: parameters at the run's dtype, plus the
activations the forward pass keeps alive, plus a fixed cost for the libraries."""

from __future__ import annotations

import re
from dataclasses import dataclass

from bughunt.errors import BughuntError
from bughunt.spec import Spec

GB = 1 << 30
BYTES = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}
# Of the RAM available, what `--device-map auto` lets accelerate fill with layers before it offloads the rest to disk:
# the remainder is left to the reference, the traces and the page cache that reads the offloaded weights back.
CPU_SHARE_WITH_OFFLOAD = 0.35
PARENT_GB = 0.5  # the comparing process itself: numpy, the spec, per-position metrics, a block of each trace


def parse_size(text: str) -> int:
    """'12G', '12GB', '12GiB', '800M' or a number of bytes -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise BughuntError(f"--max-memory {text!r} is not a size. Write it like 20G, 20GB or 512M.")
    value = float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": GB, "T": 1 << 40}[m.group(2).upper()]
    if value <= 0:
        raise BughuntError(f"--max-memory must be positive, got {text!r}.")
    return int(value)


def available_memory() -> int:
    """Memory this run may use: what the OS reports available now (cgroup limits included when psutil sees them)."""
    import psutil

    return int(psutil.virtual_memory().available)


def parameter_count(spec: Spec) -> int:
    """Parameters implied by the spec (tied embeddings counted once)."""
    h, v, i = spec.hidden_size, spec.vocab_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    layer = h * (q + 2 * kv) + q * h + 3 * h * i + 4 * h
    return spec.num_layers * layer + v * h * (1 if spec.tie_word_embeddings else 2) + h


def _largest_layer_params(spec: Spec) -> int:
    h, i = spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    return h * (q + 2 * kv) + q * h + 3 * h * i


@dataclass
class Estimate:
    label: str
    peak_bytes: int
    formula: str

    def as_dict(self) -> dict:
        return {"label": self.label, "peak_gb": round(self.peak_bytes / GB, 2), "formula": self.formula}


def estimate(name: str, label: str, spec: Spec, dtype: str, tokens_shape: tuple[int, int], device: str = "cpu",
             device_map: str | None = None) -> Estimate:
    """Peak resident (host) memory of one implementation's run, from what its runner says about itself: the resident
    cost of its library (`library_gb`), whether it streams one layer's weights at a time (`streams_layers`: the
    reference) and whether it converts from a float32 copy of the weights (`converts_from_fp32`)."""
    from bughunt.implementations import runner_class_unchecked

    runner = runner_class_unchecked(name)
    lib = runner.library_gb * GB
    if runner.streams_layers:
        peak, formula = _streaming_peak(spec, tokens_shape)
    else:
        peak, formula = _loaded_peak(spec, dtype, tokens_shape, device, device_map, runner.converts_from_fp32)
    return Estimate(label, int(peak + lib), formula + " + library")


def _streaming_peak(spec: Spec, tokens_shape: tuple[int, int]) -> tuple[int, str]:
    """One layer's weights in float64 (+ its stored copy being read), float64 activations of a layer, one block of
    attention scores and one vocabulary chunk of the output embedding (reference_impls/_numerics.py CHUNK_BYTES)."""
    b, s = tokens_shape
    h, i, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    layer = _largest_layer_params(spec) * (8 + 2)
    acts = b * s * (6 * h + 4 * i) * 8
    chunks = 3 * (64 << 20)
    logits = b * s * v * 8 // 4  # the logits buffer is on disk; a quarter resident while it is written
    return layer + acts + chunks + logits, "largest layer x 10 B + activations (6 h + 4 i) x 8 B x tokens + chunks"


def _loaded_peak(spec: Spec, dtype: str, tokens_shape: tuple[int, int], device: str, device_map: str | None,
                 converts_from_fp32: bool) -> tuple[int, str]:
    """The whole model at its dtype (on the host unless on cuda; at most its RAM share with --device-map auto), the
    activations eager attention keeps, the logits and their copies, and conversion buffers where the runner converts."""
    b, s = tokens_shape
    h, i, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    width = BYTES.get(dtype, 4)
    params = parameter_count(spec)
    on_host = 0 if device == "cuda" else 1
    weights = params * width * on_host
    if device_map == "auto" and device == "cpu":  # at most its share of RAM; the rest is offloaded to disk
        weights = min(weights, int(available_memory() * CPU_SHARE_WITH_OFFLOAD))
    acts = b * s * (8 * h + 3 * i) * width + b * spec.num_heads * s * s * width * 3  # eager attention keeps scores and probs
    logits = b * s * v * (width + 4 + 4)  # model-dtype logits, their fp32 copy, and the trace's copy on its way out
    extra = 0
    if converts_from_fp32:
        extra = params * width // 8  # conversion buffers
        weights = params * (width + 4) * on_host  # they convert from a float32 copy
    return weights + acts * on_host + logits + extra, "parameters x dtype bytes + activations + logits"



# A run whose forward pass needs at most this many matmul FLOPs is light: its time goes to importing libraries and
# loading, which overlap well, so its implementations may share the cores. A heavier one is compute-bound: two of its
# implementations side by side on the same cores only slow each other (measured on the Llama 3.2 1B shape, 64 tokens,
# 2 cores: hf and the reference side by side 31 s, the reference's two passes 24.5 s of it against 10 s alone).
LIGHT_FLOPS = 5e10


@dataclass
class Schedule:
    side_by_side: bool
    budget: int
    budget_source: str
    estimates: list[Estimate]
    reason: str = ""

    def as_dict(self) -> dict:
        return {"side_by_side": self.side_by_side, "budget_gb": round(self.budget / GB, 2), "budget_source": self.budget_source,
                "estimates": [e.as_dict() for e in self.estimates], "reason": self.reason}


def matmul_parameters(spec: Spec) -> int:
    """Weights that enter a matrix multiplication in the forward pass: every projection plus the output embedding
    (tied or not). The input embedding is a row gather, not a matmul; norms and biases are elementwise."""
    return spec.num_layers * _largest_layer_params(spec) + spec.vocab_size * spec.hidden_size


def forward_flops(spec: Spec, tokens: int) -> float:
    """Matmul FLOPs of the projections and the output embedding in one forward pass over `tokens` positions."""
    return 2.0 * tokens * matmul_parameters(spec)


def plan(estimates: list[Estimate], max_memory: int | None = None, tokens: int = 0, dtype: str = "fp32",
         flops: float = 0.0, ncores: int | None = None) -> Schedule:
    """Side by side when every estimate fits at once and the cores allow it (a light run, or two cores per
    implementation), one after another otherwise; refuse a run in which even one implementation alone cannot fit."""
    budget = max_memory if max_memory is not None else available_memory()
    source = "--max-memory" if max_memory is not None else "available memory"
    parent = int(PARENT_GB * GB)
    too_big = [e for e in estimates if e.peak_bytes + parent > budget]
    if too_big:
        worst = max(too_big, key=lambda e: e.peak_bytes)
        hints = [f"fewer tokens (the run has {tokens})" if tokens > 64 else None,
                 "a lower dtype (--dtype bf16)" if dtype in ("fp32", "fp64") else None,
                 "--device-map auto (accelerate offloads what does not fit to disk)" if worst.label.startswith("hf") else None,
                 "--max-memory if more memory is really free"]
        raise BughuntError(
            f"this run cannot fit in {budget / GB:.1f} GB ({source}): {worst.label} needs about {worst.peak_bytes / GB:.1f} GB "
            f"({worst.formula}). Try " + ", ".join(h for h in hints if h) + ".")
    together = sum(e.peak_bytes for e in estimates) + parent
    if ncores is None:
        from reference_impls._weights import cores  # the cores the reference's conversions are split across

        ncores = cores()
    if together > budget:
        return Schedule(False, budget, source, estimates, f"together they need about {together / GB:.1f} GB")
    if len(estimates) > 1 and flops > LIGHT_FLOPS and ncores < 2 * len(estimates):
        return Schedule(False, budget, source, estimates,
                        f"compute-bound ({flops / 1e9:.0f} GFLOP a forward pass) on {ncores} cores: side by side they would share them")
    return Schedule(True, budget, source, estimates, "")


def describe(schedule: Schedule) -> str:
    parts = ", ".join(f"{e.label} ~{e.peak_bytes / GB:.1f} GB" for e in schedule.estimates)
    how = "side by side" if schedule.side_by_side else "one after another"
    why = f", {schedule.reason}" if schedule.reason else ""
    return f"{how} within {schedule.budget / GB:.1f} GB ({schedule.budget_source}{why}): {parts}"
