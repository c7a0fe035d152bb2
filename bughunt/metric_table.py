"""The metrics a comparison reports at a capture point, in one table: which way is better, where each exists, how a
baseline rounds it and how a rule measures "worse". `ci` (threshold validation, judging, baselines) reads it here."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Literal


@dataclass(frozen=True)
class Metric:
    name: str
    direction: Literal["lower", "higher", "nearer"]  # lower / higher is better, or nearer to `perfect` either way
    perfect: float | None  # the value of exact agreement; None for a count that has none (gen_matched_steps)
    logits_only: bool  # exists only at the logits capture point
    baseline_digits: int | None  # significant digits a baseline keeps (of the distance from `perfect`); None: exact
    description: str
    judged_as: str  # the quantity a baseline or floor rule bounds: "1 - cosine", "L2", "|delta_nll|"
    log10: bool = False  # the value is log10 of a magnitude: "worse" is judged on 10 ** value; null means exactly zero
    floor: str | None = None  # the comparison key with this metric's noise floor (a floor_factor rule can judge it)
    needs_generation: bool = False  # measured only when the cells also generate (a matrix's `generate`)

    def badness(self, value: float | None) -> float | None:
        """A linear measure that grows as the metric gets worse (judged_as): 0 at exact agreement."""
        if value is None or self.perfect is None:
            return None
        if self.log10:
            value = 10.0 ** value
        if self.direction == "lower":
            return value - self.perfect
        if self.direction == "higher":
            return self.perfect - value
        return abs(value - self.perfect)

    @property
    def bounds_magnitude(self) -> bool:
        """max and min bound |value| (a loss moved either way is a difference), not the signed value."""
        return self.direction == "nearer" and self.perfect == 0

    def rounded(self, value: float | None) -> float | None:
        """The value a baseline stores: `baseline_digits` significant digits of the distance from `perfect`."""
        if value is None or self.baseline_digits is None:
            return None if value is None else float(value)
        digits = self.baseline_digits - 1
        if not self.perfect:
            return float(f"{value:.{digits}e}")
        return float(Decimal(repr(self.perfect)) + Decimal(f"{value - self.perfect:.{digits}e}"))

    def format(self, value: float | None) -> str:
        """The value as a message shows it."""
        if value is None:
            return "none"
        if self.log10:
            return f"{value:.2f}"
        if self.perfect is None:
            return f"{value:g}"
        return f"{value:.6g}" if self.perfect == 1 else f"{value:.1e}"


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("rel_l2", "lower", 0.0, False, 4, "relative L2 of the difference, ||candidate - reference|| / ||reference||",
           "rel_l2", floor="floor_rel_l2"),
    Metric("log10_l2", "lower", 0.0, False, 4, "log10 of the L2 norm of the difference (null when it is exactly zero)",
           "L2", log10=True),
    Metric("max_abs", "lower", 0.0, False, 4, "largest absolute difference", "max_abs"),
    Metric("kl", "lower", 0.0, True, 4, "KL divergence of the next-token distributions (reference || candidate)", "kl"),
    Metric("cosine", "higher", 1.0, False, 4, "cosine similarity of candidate and reference", "1 - cosine"),
    Metric("top1", "higher", 1.0, True, 4, "fraction of positions whose top-1 next token agrees", "1 - top1"),
    Metric("delta_nll", "nearer", 0.0, True, 4, "candidate minus reference mean NLL of the input's next tokens (nats/token)",
           "|delta_nll|", floor="floor_delta_nll"),
    Metric("ppl_ratio", "nearer", 1.0, True, 4, "perplexity ratio exp(delta_nll)", "|ppl_ratio - 1|"),
    Metric("gen_matched_steps", "higher", None, True, None,
           "greedy tokens equal to the reference's before the first difference; a count, judged by min and max",
           "gen_matched_steps", needs_generation=True),
    Metric("gen_topk_ok", "higher", 1.0, True, 4,
           "fraction of rows whose first differing token is in the reference's top k", "1 - gen_topk_ok", needs_generation=True),
)}
