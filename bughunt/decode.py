"""The `decode` experiment: does incremental decoding (prefill, then one token at a time through the KV cache)
give the logits a full forward pass gives? And does it agree, step by step, with a reference decoding the same
tokens? Reports the first step that departs. Implementations without a KV cache path decode by recomputing each
prefix (exactly what a cache must reproduce).

The floor of a step: incremental decoding reorders every reduction (a one-row product instead of a block's, a cache
read instead of the full attention), so it and the full pass are two correct computations at the dtype, each within its
noise floor of float64 (bughunt/floors.py, which sums in fp32 in two orders at fp32). They may then differ by up to the
sum of the two floors at that position: twice the dtype's logits floor against its own full pass; against a reference
decoding at another dtype, the candidate's floor plus the reference's (nothing for a float64 reference)."""

from __future__ import annotations

import datetime as _dt
import shlex
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from bughunt import sources
from bughunt.assemble import save
from bughunt.floors import floor_from, method, reference_with_floors
from bughunt.plan import DEFAULT_FLOOR_FACTOR, read_inputs
from bughunt.errors import BughuntError
from bughunt.findings import Finding
from bughunt.inputs.config import validate_decode_config
from bughunt.inputs.flags import positive
from bughunt.implementations import ImplChoice, runner_class
from bughunt.jobs import Load
from bughunt.output import check_output_dir
from bughunt.result import SCHEMA_VERSION, Result, environment
from bughunt.spec import load_config
from bughunt.text import attach


def _rel_per_step(a: np.ndarray, b: np.ndarray) -> list[float]:
    d = (a.astype(np.float64) - b.astype(np.float64))[0]
    ref = b.astype(np.float64)[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return [float(v) for v in np.linalg.norm(d, axis=-1) / np.linalg.norm(ref, axis=-1)]


def incremental(choice: ImplChoice, checkpoint: Path, spec, dtype: str, device: str, tokens: np.ndarray, prefill: int,
                decode_config: dict | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(full-pass logits, incremental logits, how the incremental path was taken)."""
    from bughunt.envs import refuse_in_process

    refuse_in_process(choice, "decode runs implementations in this process")
    cls = runner_class(choice.name)
    with cls(checkpoint, spec, dtype, device, branches=False, label=choice.label, toggles=choice.toggle_dict) as runner:
        full = runner.run(tokens).arrays["logits"]
        if hasattr(runner, "incremental_logits"):
            return full, runner.incremental_logits(tokens, prefill, decode_config), "kv-cache"
        if decode_config:
            raise BughuntError(f"{choice.label} has no KV-cache path, so a decode-only config change means nothing for it.")
        rows = [runner.run(tokens[:, :prefill]).arrays["logits"]]
        rows += [runner.run(tokens[:, :t + 1]).arrays["logits"][:, -1:] for t in range(prefill, tokens.shape[1])]
        return full, np.concatenate(rows, axis=1), "prefix recomputation"


def step_floors(checkpoint: Path, spec, tokens: np.ndarray, dtypes: list[str]) -> dict[str, list[float]]:
    """dtype -> the logits' noise floor (relative L2) at each position of `tokens`, from the float64 reference and the
    passes emulating each dtype run side by side (a float64 side: its unit roundoff)."""
    import tempfile

    load = Load(ImplChoice("reference", "fp64"), Path(checkpoint), spec, "fp64", branches=False)
    with tempfile.TemporaryDirectory(prefix="bughunt-decode-floor-") as scratch:
        fp64, emulated = reference_with_floors(load, tokens, dtypes, Path(scratch))
        out = {}
        for d in dict.fromkeys(dtypes):
            logits = floor_from(fp64, emulated.get(d), d, tokens)["points"]["logits"]
            out[d] = logits.get("floor_rel_l2_per_position") or [logits["floor_rel_l2"]] * tokens.shape[1]
        del fp64, emulated
    return out


class DecodeOptions(BaseModel):
    """decode_check's keywords: the reference to decode against (optional), dtype and device, the input (ids or text),
    the prefill length, the decode-only config change, the floor factor and where to write."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    reference: str | None = None
    dtype: str = "fp32"
    device: str = "cpu"
    tokens: Any = None
    prefill: int = 1
    decode_config: dict | None = None
    floor_factor: float = DEFAULT_FLOOR_FACTOR
    out: str | Path | None = None
    text: Any = None


def _read(checkpoint: Path, o: DecodeOptions):
    """The decode check's planning stage: (the checkpoint directory, its inputs, the checked decode config); every
    refusal happens here."""
    if o.out is not None:
        check_output_dir(o.out, "decode", [("the checkpoint", checkpoint)])
    checkpoint = sources.resolve(checkpoint)  # a GGUF file's view, a hub id's snapshot, or the directory itself
    inputs = read_inputs(checkpoint, o.tokens, o.text, default_length=32)  # the planning stage compare and sweep share
    decode_config = validate_decode_config(o.decode_config or {}, load_config(checkpoint), str(checkpoint / "config.json"))
    positive(o.floor_factor, "--floor-factor", "a finding is a point above this multiple of the noise floor")
    if inputs.tokens.shape[0] != 1:
        raise BughuntError("decode checks one sequence at a time: give a single row of tokens.")
    if not 1 <= o.prefill < inputs.tokens.shape[1]:
        raise BughuntError(f"--prefill must be between 1 and {inputs.tokens.shape[1] - 1} (the number of tokens minus one).")
    return checkpoint, inputs, decode_config


def decode_check(checkpoint: str | Path, impl: str = "hf", **settings) -> Result:
    """Full forward pass vs incremental decoding (prefill, then one token at a time) of implementation `impl`, and
    against `reference` when given; `settings` are DecodeOptions' fields."""
    from bughunt.plan import validated

    o = validated(DecodeOptions, settings)
    reference, dtype, device, prefill, floor_factor, out = o.reference, o.dtype, o.device, o.prefill, o.floor_factor, o.out
    checkpoint, inputs, decode_config = _read(Path(checkpoint), o)
    spec, tokens, encoded = inputs.spec, inputs.tokens, inputs.encoded
    cand = ImplChoice.parse(impl)
    cand_dtype = cand.dtype or dtype
    full, inc, how = incremental(cand, checkpoint, spec, cand_dtype, device, tokens, prefill, decode_config)
    ref = ImplChoice.parse(reference) if reference else None
    ref_dtype = (ref.dtype or cand_dtype) if ref else None
    floors = step_floors(checkpoint, spec, tokens, [cand_dtype] + ([ref_dtype] if ref else []))

    def judge(rel: list[float], floor: list[float]) -> int | None:
        return next((t for t in range(prefill, len(rel)) if not rel[t] <= floor_factor * floor[t]), None)

    self_floor = [2 * f for f in floors[cand_dtype]]
    self_rel = _rel_per_step(inc, full)
    data_decode = {"candidate": cand.label, "prefill": prefill, "path": how, "decode_config": decode_config or {},
                   "floor_method": f"the sum of the two sides' logits floors at each step; each: {method(cand_dtype)}",
                   "steps": list(range(tokens.shape[1])),
                   "self": {"rel_l2": self_rel, "floor_rel_l2": self_floor, "first_departing_step": judge(self_rel, self_floor)}}
    findings = []
    if data_decode["self"]["first_departing_step"] is not None:
        t = data_decode["self"]["first_departing_step"]
        findings.append(Finding("warning", "decode", f"{cand.label}: incremental decoding departs from its own full forward "
                                f"pass at step {t} (position {t}; relative L2 {self_rel[t]:.2e})", cand.label, "logits").to_dict())
    if ref:
        _, ref_inc, ref_how = incremental(ref, checkpoint, spec, ref_dtype, device, tokens, prefill, None)
        cross, cross_floor = _rel_per_step(inc, ref_inc), [a + b for a, b in zip(floors[cand_dtype], floors[ref_dtype])]
        data_decode["reference"] = {"label": ref.label, "path": ref_how, "rel_l2": cross, "floor_rel_l2": cross_floor,
                                    "first_departing_step": judge(cross, cross_floor)}
        t = data_decode["reference"]["first_departing_step"]
        if t is not None:
            findings.append(Finding("warning", "decode", f"{cand.label}: decoding departs from {ref.label} at step {t} "
                                    f"(relative L2 {cross[t]:.2e})", cand.label, "logits").to_dict())
    data = {
        "schema": "bughunt.result", "schema_version": SCHEMA_VERSION, "kind": "decode",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["bughunt", "decode", sources.given_name(checkpoint), "--impl", cand.label, "--dtype", dtype, "--prefill", str(prefill)]
                              + (["--reference", reference] if reference else [])
                              + [a for k, v in (decode_config or {}).items() for a in ("--decode-config", f"{k}={v}")]
                              + ["--tokens", ",".join(str(int(t)) for t in tokens[0])]),
        "checkpoint": {"path": str(checkpoint), "spec": spec.to_dict(), "source": sources.describe(checkpoint)},
        "inputs": {"tokens": tokens.tolist()},
        "settings": {"dtype": dtype, "device": device, "reference": reference or cand.label, "floor_factor": floor_factor},
        "environment": environment(),
        "implementations": [{"label": cand.label, "name": cand.name, "dtype": cand_dtype, "device": device, "status": "ok",
                             "error": None, "meta": {}}],
        "noise_floor": {}, "comparisons": [], "findings": findings, "decode": data_decode,
    }
    attach(data, encoded)
    result = Result(data)
    if out is not None:  # the report's decode section is drawn from data["decode"] (templates/sections/decode.html)
        save(result, Path(out), {}, render=True)
    return result

