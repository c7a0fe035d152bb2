"""What a run concludes, one sentence each: the `Finding` every experiment, probe and check reports (stored in
result.json as a plain dict with these fields)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class Finding:
    """One conclusion: how serious (error, warning, info), what kind (divergence, loss, weights, generation, ...),
    about which implementation and capture point (None where it concerns the run or the checkpoint), in words."""

    severity: str
    kind: str
    message: str
    implementation: str | None = None
    point: str | None = None

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"finding severity must be one of {SEVERITIES}, not {self.severity!r}")

    def to_dict(self) -> dict:
        """The result.json form: severity, kind, implementation, point, message."""
        d = asdict(self)
        return {k: d[k] for k in ("severity", "kind", "implementation", "point", "message")}
