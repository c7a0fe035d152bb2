"""bughunt's own documents read back from disk: TOML matrices (UTF-8, valid TOML), CI baselines (the points list with
a name and numeric metrics per capture point) and result.json (the versioned JSON schema in
bughunt/schemas/result.schema.json, plus the cross-field facts the report relies on)."""

from __future__ import annotations

import json
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import ConfigDict, create_model, Field, StrictStr, TypeAdapter, ValidationError

from bughunt.errors import BughuntError
from bughunt.metric_table import METRICS
from bughunt.inputs.files import decode_utf8, found, location, parse_json, read_bytes, read_text, validation_message

MATRIX_FIX = "Fix the file (see examples/bughunt.toml)."
RESULT_FIX = ("The file is damaged, incomplete or was not written by this version of bughunt; "
              "run the command that wrote it again (its command line is in the file's \"command\" field).")
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "result.schema.json"


def read_toml(path: Path, what: str = "matrix file") -> dict:
    path = Path(path)
    raw = read_bytes(path, what, MATRIX_FIX)
    text = decode_utf8(raw, path, what, "TOML files are UTF-8; save it as UTF-8.")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BughuntError(f"{path} is not valid TOML: {e}. Fix the syntax (see examples/bughunt.toml).") from None


# ---- baselines ------------------------------------------------------------------------------------------------

Metric = Annotated[float, Field(strict=True)] | None


# one optional number per metric of the metric table (bughunt/metric_table.py): a new metric needs no line here
BaselinePoint = create_model("BaselinePoint", __config__=ConfigDict(extra="forbid"), point=(StrictStr, ...),
                             **{name: (Metric, None) for name in METRICS})


_POINTS = TypeAdapter(list[BaselinePoint])


def read_baseline_json(path: Path, fix: str) -> Any:
    """A baseline file's JSON (UTF-8, valid JSON); its schema and identity are checked by the ci module."""
    return parse_json(read_text(path, "baseline", fix), Path(path), "baseline", fix)


def check_baseline_points(points: Any, path: Path, fix: str) -> None:
    try:
        _POINTS.validate_python(points)
    except ValidationError as e:
        raise BughuntError(validation_message(e, f"baseline {path}", fix, prefix="points")) from None


# ---- result.json ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _result_validator():
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


def check_result(data: Any, source: str) -> dict:
    """Validate a result document against the schema and the facts the plots rely on; return it unchanged."""
    import jsonschema

    if not isinstance(data, dict):
        raise BughuntError(f"{source} holds {found(data)}, not a bughunt result (a JSON object). {RESULT_FIX}")
    if data.get("schema") != "bughunt.result":
        raise BughuntError(f"{source} is not a bughunt result (its \"schema\" field is {found(data.get('schema'))}; "
                           f"expected \"bughunt.result\"). Point at a result.json a bughunt run wrote.")
    error = jsonschema.exceptions.best_match(_result_validator().iter_errors(data))
    if error is not None:
        where = location(tuple(error.absolute_path))
        raise BughuntError(f"{source}: field '{where}' {_describe(error)}. {RESULT_FIX}")
    for i, c in enumerate(data["comparisons"]):
        lengths = {len(v) for p in c["points"] for v in (p.get("per_position") or {}).values()}
        if len(lengths) > 1:
            raise BughuntError(f"{source}: field 'comparisons[{i}].points': the per-position lists have different lengths "
                               f"({sorted(lengths)}); expected one length, the number of positions. {RESULT_FIX}")
    decode = data.get("decode")
    if decode:
        for key in ("self", "reference"):
            series = (decode.get(key) or {}).get("rel_l2")
            if series is not None and any(t >= len(series) for t in decode["steps"]):
                raise BughuntError(f"{source}: field 'decode.{key}.rel_l2' has {len(series)} entries but decode.steps runs to "
                                   f"{max(decode['steps'])}; expected one entry per step. {RESULT_FIX}")
    if len({len(row) for row in data["inputs"]["tokens"]}) > 1:
        raise BughuntError(f"{source}: field 'inputs.tokens' has rows of different lengths; expected equal-length rows. {RESULT_FIX}")
    return data


def _describe(error) -> str:
    if error.validator == "required":
        return f"lacks {error.message.split(' is a required')[0]}, which is required"
    return f"is {found(error.instance)}; {error.message}"
