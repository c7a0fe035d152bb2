"""The Result: one JSON document per run (versioned schema) holding inputs, environment, every trace's
metadata, every comparison and the findings. Plots and HTML are rendered from it alone."""

from __future__ import annotations

import json
import math
import platform
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from bughunt.errors import BughuntError

# 2: decode keeps only its data ("decode"); before, it also stored its report section as HTML in extra_sections.
# 3: ci keeps its gate table as data ("ci_gate"); nothing bughunt writes stores HTML any more.
# Results of versions 1 and 2 still load and render (report.stored_sections, through the sanitizer).
SCHEMA_VERSION = 3
SCHEMA_PATH = Path(__file__).parent / "schemas" / "result.schema.json"


def environment() -> dict:
    packages = {}
    for name in ("bughunt", "torch", "transformers", "numpy", "ml-dtypes", "safetensors", "jax", "flax", "gemma", "keras", "keras-hub"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(), "packages": packages}


def _clean(obj):
    """Replace non-finite floats by None so the document is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


@dataclass
class Result:
    data: dict

    # -- convenient views ---------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.data["kind"]

    @property
    def findings(self) -> list[dict]:
        return self.data["findings"]

    @property
    def comparisons(self) -> list[dict]:
        return self.data["comparisons"]

    def comparison(self, candidate: str) -> dict:
        for c in self.comparisons:
            if c["candidate"] == candidate:
                return c
        raise KeyError(f"no comparison for {candidate!r}; have {[c['candidate'] for c in self.comparisons]}")

    def metric(self, candidate: str, point: str, name: str = "rel_l2"):
        for p in self.comparison(candidate)["points"]:
            if p["point"] == point:
                return p.get(name)
        raise KeyError(point)

    def first_above_floor(self, candidate: str) -> str | None:
        return self.comparison(candidate)["first_above_floor"]

    # -- files --------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(_clean(self.data), indent=1, allow_nan=False)

    @classmethod
    def load(cls, path: Path) -> "Result":
        path = Path(path)
        if path.is_dir():
            path = path / "result.json"
        if not path.exists() and not path.is_symlink():
            raise BughuntError(f"no result at {path}. Point at a result.json or the directory a run wrote.")
        from bughunt.inputs.documents import RESULT_FIX, check_result
        from bughunt.inputs.files import read_json

        return cls(check_result(read_json(path, "result", RESULT_FIX), str(path)))

    def validate(self) -> None:
        """Check against the JSON schema (needs the jsonschema package)."""
        import jsonschema

        jsonschema.validate(json.loads(self.to_json()), json.loads(SCHEMA_PATH.read_text()))


def write_atomically(out: Path, write, kind: str = "compare", protect=()) -> Path:
    """Build the output directory in a temporary sibling and move it into place only when complete, under the
    `--out` policy of bughunt.output (a failed run leaves nothing; only bughunt's own earlier output is replaced)."""
    from bughunt.output import write_output_dir

    return write_output_dir(out, kind, write, protect)
