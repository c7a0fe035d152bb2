"""The first stage of every experiment: read and validate everything a run needs (checkpoint, spec, weights, input
ids or text, implementations, options, probes, the memory schedule) into one frozen `Plan`. Every refusal happens
here, before anything costly: environments are built only after the plan is accepted (bughunt/context.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from bughunt import envs
from bughunt import sources
from bughunt.checkpoint import validate_weights
from bughunt.errors import BughuntError
from bughunt.implementations import DEVICES, DTYPES, ImplChoice
from bughunt.inputs.flags import choice_of, positive
from bughunt.memory import Schedule
from bughunt.spec import Spec, load_spec

DEFAULT_FLOOR_FACTOR = 10.0
DEFAULT_LENGTH = 16


Dtype = choice_of(DTYPES, "dtype")  # the run's dtype, in every experiment's options
Device = choice_of(DEVICES, "device")


class CompareOptions(BaseModel):
    """How a compare runs, apart from its probes: the reference, dtype and device, the floor factor, loading and
    isolation, limits, and where its files go. compare() keywords; the CLI's flags map onto them."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    reference: str | ImplChoice = "reference"
    dtype: Dtype = "fp32"
    device: Device = "cpu"
    tokens: Any = None  # ids: a sequence, or [batch, seq]; None: the text, else seeded ids
    text: Any = None  # a bughunt.text.TextRequest or EncodedText
    out: Path | None = None
    floor_factor: float = DEFAULT_FLOOR_FACTOR
    branches: bool = True
    allow_pickle: bool = False
    render: bool = True
    isolate: bool = True  # every implementation but the in-process reference in a worker process
    timeout: float | None = None
    max_memory: int | None = None
    device_map: str | None = None
    require_comparison: bool = False  # the CLI: refuse a run with nothing to compare

    @field_validator("floor_factor")
    @classmethod
    def _factor(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"--floor-factor must be positive, got {v}.")
        return v

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: float | None) -> float | None:
        positive(v, "--timeout", "seconds an implementation's worker may take per run")
        return v

    @field_validator("device_map")
    @classmethod
    def _device_map(cls, v: str | None) -> str | None:
        if v not in (None, "auto"):
            raise ValueError(f"--device-map {v!r} is not supported; use --device-map auto.")
        return v


def validated(model: type[BaseModel], values: dict) -> Any:
    """`model(**values)`, with a validation error turned into the BughuntError a user reads (exit 2)."""
    try:
        return model(**values)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "extra_forbidden":
            raise BughuntError(f"unknown option '{err['loc'][0]}'. Known: {', '.join(sorted(model.model_fields))}.") from None
        message = str(err.get("ctx", {}).get("error") or err["msg"])
        where = ".".join(str(x) for x in err["loc"])
        raise BughuntError(message if err["type"] == "value_error" else f"{where}: {message}") from None


@dataclass(frozen=True)
class Plan:
    """Everything a run needs, checked: read it, never change it."""

    checkpoint: Path
    spec: Spec
    weights: Any  # bughunt.checkpoint.Inventory: its `unexpected` tensors are reported
    tokens: np.ndarray
    encoded: Any  # bughunt.text.EncodedText, or None when the input was ids
    choices: tuple[ImplChoice, ...]  # every implementation, the reference among them
    reference: ImplChoice
    options: CompareOptions
    probes: tuple[tuple[Any, Any], ...]  # (probe, its options) for each probe the run asked for
    schedule: Schedule | None = None

    def dtype_of(self, choice: ImplChoice) -> str:
        return choice.dtype_at(self.options.dtype)

    @property
    def candidates(self) -> list[ImplChoice]:
        return [c for c in self.choices if c is not self.reference]

    @property
    def trace_fields(self) -> dict:
        """What the run's probes set on every trace job (the points inside the layers, the weight check)."""
        fields = {}
        for probe, options in self.probes:
            fields.update(probe.trace_job(options))
        return fields

    def probe_options(self, name: str) -> Any:
        """The options of probe `name` when the run asked for it, else None."""
        return next((o for p, o in self.probes if p.name == name), None)


def default_tokens(spec: Spec, length: int = DEFAULT_LENGTH, seed: int = 0) -> np.ndarray:
    """Deterministic ids: BOS (when the config has one) followed by seeded ids that avoid the special ids 0-2."""
    rng = np.random.default_rng(seed)
    hi = min(spec.vocab_size, 32000)
    body = rng.integers(3, hi, size=length - (spec.bos_token_id is not None))
    ids = ([spec.bos_token_id] if spec.bos_token_id is not None else []) + body.tolist()
    return np.asarray([ids], dtype=np.int64)


def choices_of(implementations: Iterable[str | ImplChoice], reference: str | ImplChoice) -> tuple[list[ImplChoice], ImplChoice]:
    """The implementations as choices, the reference among them (added first when it was not named)."""
    choices = [c if isinstance(c, ImplChoice) else ImplChoice.parse(c) for c in implementations]
    ref = ImplChoice.parse(reference) if isinstance(reference, str) else reference
    labels = [c.label for c in choices]
    if len(set(labels)) != len(labels):
        raise BughuntError(f"an implementation is named twice: {labels}. Give each --impl once (add :DTYPE to tell them apart).")
    match = [c for c in choices if c.label == ref.label] or [c for c in choices if c.name == ref.name and ref.dtype is None]
    if not match:
        choices.insert(0, ref)
        match = [ref]
    return choices, match[0]


def native_dtypes(choices: list[ImplChoice], ref: ImplChoice, checkpoint: Path) -> tuple[list[ImplChoice], ImplChoice]:
    """Choices named without a dtype run at the one the checkpoint decides for their runner, where it does (llamacpp
    on a GGUF file: the file's own type)."""
    from bughunt.implementations import runner_class_unchecked

    out = []
    for c in choices:
        native = None if c.dtype else runner_class_unchecked(c.name).native_dtype(checkpoint)
        out.append(dataclasses.replace(c, dtype=native) if native else c)
    return out, out[choices.index(ref)]


@dataclass(frozen=True)
class Inputs:
    """What every experiment reads first: the spec, the weights' inventory, the ids every implementation is fed and the
    encoded text they came from (None when the input was ids)."""

    spec: Spec
    weights: Any
    tokens: np.ndarray
    encoded: Any


def read_inputs(checkpoint: Path, tokens=None, text=None, allow_pickle: bool = False,
                default_length: int = DEFAULT_LENGTH) -> Inputs:
    """The checkpoint's spec and weights checked, and its input: `tokens`, else `text` through the checkpoint's
    tokenizer, else seeded ids of `default_length`; ids outside the vocabulary are refused. compare, sweep and decode
    all start here."""
    from bughunt.inputs.tokens import check_token_range
    from bughunt.text import resolve_input

    spec = load_spec(checkpoint)
    weights = validate_weights(checkpoint, spec, allow_pickle)
    ids, encoded = resolve_input(checkpoint, spec, tokens, text)
    ids = default_tokens(spec, default_length) if ids is None else ids
    check_token_range(ids, spec.vocab_size)
    return Inputs(spec, weights, ids, encoded)


def split_options(settings: dict) -> tuple[CompareOptions, list[tuple[Any, Any]]]:
    """compare() keywords -> the run's options and, for each probe the run asked for, its options."""
    from bughunt import probes

    owners = probes.option_names()
    unknown = sorted(set(settings) - set(owners) - set(CompareOptions.model_fields))
    if unknown:
        known = sorted({*owners, *CompareOptions.model_fields})
        raise BughuntError(f"unknown option '{unknown[0]}'. Known: {', '.join(known)}.")
    options = validated(CompareOptions, {k: v for k, v in settings.items() if k not in owners})
    asked = []
    for probe in probes.registered():
        mine = {k: v for k, v in settings.items() if owners.get(k) is probe}
        probe_options = validated(probe.Options, mine)
        if probe.enabled(probe_options):
            asked.append((probe, probe_options))
    return options, asked


def _schedule(plan: Plan) -> Schedule:
    from bughunt import memory

    o = plan.options
    estimates = [memory.estimate(c.name, c.label, plan.spec, plan.dtype_of(c), plan.tokens.shape, o.device, o.device_map)
                 for c in plan.choices]
    return memory.plan(estimates, o.max_memory, plan.tokens.shape[1], o.dtype, memory.forward_flops(plan.spec, plan.tokens.size))


def make_plan(checkpoint: str | Path, implementations: Sequence[str | ImplChoice], settings: dict) -> Plan:
    """Read and check a compare run: raises BughuntError (exit 2) before anything costly when it cannot run."""
    from bughunt.output import check_output_dir

    checkpoint = Path(checkpoint)
    options, asked = split_options(settings)
    if options.out is not None:
        check_output_dir(options.out, "compare", [("the checkpoint", checkpoint)])
    checkpoint = sources.resolve(checkpoint)  # a GGUF file's view, a hub id's snapshot, or the directory itself
    inputs = read_inputs(checkpoint, options.tokens, options.text, options.allow_pickle)
    spec, weights, tokens, encoded = inputs.spec, inputs.weights, inputs.tokens, inputs.encoded
    choices, ref = choices_of(implementations, options.reference)
    choices, ref = native_dtypes(choices, ref, checkpoint)
    if options.require_comparison and all(c.label == ref.label for c in choices):
        raise BughuntError(f"nothing to compare: only the reference {ref.label} was given. Add a candidate, e.g. --impl hf.")
    plan = Plan(checkpoint, spec, weights, tokens, encoded, tuple(choices), ref, options, ())
    plan = dataclasses.replace(plan, probes=tuple((p, p.check(plan, o)) for p, o in asked))
    envs.refuse(choices, in_process=not options.isolate)  # cheap refusals; building environments waits for the context
    return dataclasses.replace(plan, schedule=_schedule(plan))
