"""The `compare` experiment: run one checkpoint through several implementations, compare each against
a chosen reference at every capture point, judge the divergence against the dtype's noise floor, and
produce a Result (plus, when asked, the files: result.json, plots, report.html, traces)."""

from __future__ import annotations

import datetime as _dt
import os
import shlex
import tempfile
from concurrent.futures import ThreadPoolExecutor
import traceback
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from bughunt import envs, progress
from bughunt.checkpoint import validate_weights
from bughunt.errors import BughuntError
from bughunt.inputs.flags import positive
from bughunt.inputs.tokens import parse_token_text, read_token_file
from bughunt.implementations import DEVICES, DTYPES, ImplChoice, runner_class
from bughunt import metrics
from bughunt.metrics import UNIT_ROUNDOFF, compare_traces
from bughunt.output import check_output_dir
from bughunt.result import SCHEMA_VERSION, Result, environment, write_atomically
from bughunt.spec import Spec, load_spec
from bughunt.text import attach, resolve_input
from bughunt.trace import Trace

DEFAULT_FLOOR_FACTOR = 10.0
DEFAULT_LENGTH = 16


def default_tokens(spec: Spec, length: int = DEFAULT_LENGTH, seed: int = 0) -> np.ndarray:
    """Deterministic ids: BOS (when the config has one) followed by seeded ids that avoid the special ids 0-2."""
    rng = np.random.default_rng(seed)
    hi = min(spec.vocab_size, 32000)
    body = rng.integers(3, hi, size=length - (spec.bos_token_id is not None))
    ids = ([spec.bos_token_id] if spec.bos_token_id is not None else []) + body.tolist()
    return np.asarray([ids], dtype=np.int64)


def parse_tokens(text: str) -> np.ndarray:
    """'2,17,99' -> [[2, 17, 99]]; several sequences of equal length separated by ';'."""
    return parse_token_text(text, "--tokens")


def read_tokens_file(path: Path) -> np.ndarray:
    return read_token_file(Path(path))


def _choices(implementations: Iterable[str | ImplChoice], reference: str) -> tuple[list[ImplChoice], ImplChoice]:
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


def run_implementation(choice: ImplChoice, checkpoint: Path, spec: Spec, dtype: str, device: str, tokens: np.ndarray,
                       branches: bool = True, allow_pickle: bool = False, stem: Path | None = None,
                       check_weights: bool = False, inner: bool = False, feed: Trace | None = None, **runner_kwargs) -> Trace:
    """Open, run and close one implementation in this process. With `stem` the trace streams to disk there. With
    `check_weights`, the loaded parameters are checked against the checkpoint (trace.meta["weight_check"]); `inner`
    and `feed` go to Runner.run (points inside the layer; each layer fed the reference's input)."""
    from bughunt.envs import refuse_in_process

    refuse_in_process(choice, "--in-process runs every implementation in this interpreter; drop --in-process")
    cls = runner_class(choice.name)
    with cls(checkpoint, spec, dtype, device, branches=branches, label=choice.label, allow_pickle=allow_pickle, **runner_kwargs) as runner:
        trace = runner.run(tokens, stem, inner=inner, feed=feed)
        if check_weights and runner.exposes_weights:
            from bughunt.weightcheck import check_for_trace

            trace.meta["weight_check"] = check_for_trace(runner)
            if trace.stem is not None:
                trace.save_meta()
        return trace


def run_choice(choice: ImplChoice, checkpoint: Path, spec: Spec, dtype: str, device: str, tokens: np.ndarray, pool=None,
               stem: Path | None = None, branches: bool = True, allow_pickle: bool = False, timeout: float | None = None,
               toggles: dict | None = None, device_map: str | None = None, check_weights: bool = False,
               inner: bool = False, feed: Trace | None = None) -> Trace:
    """Run one implementation: in this process when `pool` is None or it is the plain in-process reference, otherwise
    as a job for its worker (the trace comes back through the file `stem`)."""
    toggles = {**choice.toggle_dict, **(toggles or {})}
    extra = {"device_map": device_map} if device_map and choice.name == "hf" else {}
    if pool is None or (choice.name == "reference" and choice.python is None):
        return run_implementation(choice, checkpoint, spec, dtype, device, tokens, branches, allow_pickle, stem,
                                  check_weights, inner, feed, toggles=toggles, **extra)
    job = {"checkpoint": str(Path(checkpoint).resolve()), "name": choice.name, "choice_dtype": choice.dtype, "dtype": dtype,
           "device": device, "tokens": np.asarray(tokens).tolist(), "branches": branches, "allow_pickle": allow_pickle,
           "label": choice.label, "out_stem": str(stem), "toggles": toggles, "runner_kwargs": extra,
           "check_weights": check_weights, "inner": inner, "feed": str(feed.stem) if feed is not None else None}
    pool.run(choice.name, envs.interpreter(choice), job, timeout)
    return Trace.load(stem)


def run_reference_with_floors(choice: ImplChoice, checkpoint: Path, spec: Spec, device: str, tokens: np.ndarray,
                              floor_dtypes: Sequence[str], scratch: Path, branches: bool = True,
                              allow_pickle: bool = False, on_step=None, inner: bool = False) -> tuple[Trace, dict[str, Trace]]:
    """The float64 reference and its noise-floor passes (the reference emulating each dtype) in one read of the
    model: the passes step through the layers side by side, sharing each layer's weights."""
    from bughunt.implementations.reference import ReferenceRunner, run_together

    dtypes = [d for d in dict.fromkeys(floor_dtypes) if d != "fp64"]
    quantized = [d for d in dtypes if d not in DTYPES]  # other weights: each floor pass reads its own
    dtypes = [d for d in dtypes if d in DTYPES]
    runners = [ReferenceRunner(checkpoint, spec, "fp64", device, branches=branches, label=choice.label,
                               allow_pickle=allow_pickle, toggles=choice.toggle_dict)]
    runners += [ReferenceRunner(checkpoint, spec, d, "cpu", branches=branches, label=f"reference:{d}", allow_pickle=allow_pickle)
                for d in dtypes]
    try:
        for r in runners:
            r.open()
        traces = run_together(runners, tokens, [scratch / "reference-fp64"] + [scratch / f"floor-{d}" for d in dtypes], on_step,
                              inner)
    finally:
        for r in runners:
            r.close()
    floors = dict(zip(dtypes, traces[1:]))
    for d in quantized:
        floors[d] = run_implementation(ImplChoice("reference", d), checkpoint, spec, d, "cpu", tokens, branches,
                                       allow_pickle, scratch / f"floor-{d}")
    return traces[0], floors


def noise_floor(checkpoint: Path, spec: Spec, dtype: str, tokens: np.ndarray, fp64: Trace | None = None,
                allow_pickle: bool = False, scratch: Path | None = None, emulated: Trace | None = None,
                inner: bool = False) -> dict:
    """The divergence a correct implementation at `dtype` shows against float64: the reference emulating the
    family's HF rounding policy at that dtype, against the unrounded reference. Never below the dtype's unit roundoff.
    With `scratch`, the reference traces stream to files there instead of memory."""
    stem = (lambda name: Path(scratch) / name) if scratch is not None else (lambda name: None)
    timings = {}
    if fp64 is None and scratch is not None and dtype != "fp64":  # both passes in one read of the model
        fp64, floors = run_reference_with_floors(ImplChoice("reference", "fp64"), checkpoint, spec, "cpu", tokens, [dtype],
                                                 Path(scratch), allow_pickle=allow_pickle, inner=inner)
        emulated = floors[dtype]
    if fp64 is None:
        fp64 = run_implementation(ImplChoice("reference", "fp64"), checkpoint, spec, "fp64", "cpu", tokens,
                                  allow_pickle=allow_pickle, stem=stem("floor-fp64"), inner=inner)
        timings["fp64_forward_s"] = fp64.meta["timings"]["forward_s"]
    u = UNIT_ROUNDOFF.get(dtype, UNIT_ROUNDOFF["fp32"])  # quantized weights: llama.cpp computes in fp32
    if dtype == "fp64":
        measured = {p: {"point": p, "rel_l2": 0.0, "l2": 0.0} for p in fp64.points()}
    else:
        if emulated is None:
            emulated = run_implementation(ImplChoice("reference", dtype), checkpoint, spec, dtype, "cpu", tokens,
                                          allow_pickle=allow_pickle, stem=stem(f"floor-{dtype}"), inner=inner)
        timings["emulated_forward_s"] = emulated.meta["timings"]["forward_s"]
        measured = {m["point"]: m for m in compare_traces(emulated, fp64, tokens)}
    points = {}
    for p in fp64.points():
        ref_norm = _norm(fp64.arrays[p])
        rel = measured[p]["rel_l2"] or 0.0
        points[p] = {"rel_l2": rel, "l2": measured[p]["l2"] or 0.0, "floor_rel_l2": max(rel, u), "ref_norm": ref_norm}
        per_pos = (measured[p].get("per_position") or {}).get("rel_l2")
        if per_pos is not None:
            points[p]["floor_rel_l2_per_position"] = [max(v or 0.0, u) for v in per_pos]
    if "logits" in points:
        points["logits"].update(metrics.loss_floor(measured.get("logits", {}), fp64.arrays["logits"], tokens, u))
    return {"dtype": dtype, "unit_roundoff": u, "method": "reference emulating the family's rounding policy vs float64",
            "timings": timings, "points": points}


def _norm(array: np.ndarray) -> float:
    """L2 norm of a (possibly memory-mapped) array, read a block at a time."""
    from bughunt.safetensors_io import release

    flat = array.reshape(-1) if array.ndim else array.reshape(1)
    step = 4 << 20
    total = sum(float(np.dot(c, c)) for c in (np.asarray(flat[i:i + step], dtype=np.float64) for i in range(0, flat.size, step)))
    release(array)
    return float(np.sqrt(total))


def judge(points: list[dict], floor: dict, factor: float) -> tuple[list[dict], str | None]:
    """Annotate each point with its ratio to the floor; return the first point above factor x floor."""
    first = None
    for p in points:
        f = floor["points"].get(p["point"])
        if f is None or p.get("rel_l2") is None and not p.get("nonfinite"):
            p["above_floor"] = bool(p.get("error"))
        else:
            rel = p["rel_l2"] if p["rel_l2"] is not None else float("inf")
            p["floor_rel_l2"] = f["floor_rel_l2"]
            p["ratio_to_floor"] = rel / f["floor_rel_l2"]
            p["above_floor"] = bool(p.get("nonfinite")) or rel > factor * f["floor_rel_l2"]
            per_floor, per_rel = f.get("floor_rel_l2_per_position"), (p.get("per_position") or {}).get("rel_l2")
            if per_floor and per_rel and len(per_floor) >= len(per_rel):
                per_floor = per_floor[len(per_floor) - len(per_rel):]  # suffix-aligned, as the metrics are
                p["first_position_above_floor"] = next(
                    (i for i, (v, fl) in enumerate(zip(per_rel, per_floor)) if v is None or v > factor * fl), None)
        if f is not None and p["point"] == "logits":
            metrics.judge_loss(p, f, factor)
        if p["above_floor"] and first is None:
            first = p["point"]
    return points, first


def _command(checkpoint, choices, ref, dtype, device, tokens, floor_factor) -> str:
    parts = ["bughunt", "compare", str(checkpoint)]
    for c in choices:
        parts += ["--impl", c.label]
    parts += ["--reference", ref.label, "--dtype", dtype, "--device", device]
    parts += ["--tokens", ";".join(",".join(str(int(t)) for t in row) for row in tokens)]
    if floor_factor != DEFAULT_FLOOR_FACTOR:
        parts += ["--floor-factor", str(floor_factor)]
    return shlex.join(parts)


def compare(checkpoint: str | Path, implementations: Sequence[str | ImplChoice] = ("hf", "reference"),
            reference: str = "reference", dtype: str = "fp32", device: str = "cpu",
            tokens: Sequence[int] | np.ndarray | None = None, out: str | Path | None = None,
            floor_factor: float = DEFAULT_FLOOR_FACTOR, branches: bool = True, allow_pickle: bool = False,
            render: bool = True, isolate: bool = True, timeout: float | None = None, pool=None,
            max_memory: int | None = None, device_map: str | None = None, require_comparison: bool = False,
            weight_check: bool = False, inner: bool = False, isolate_layers: bool = False, text=None,
            generate: int | None = None, top_k: int = 5, decode_config: dict | None = None) -> Result:
    """Compare implementations of one checkpoint layer by layer. Returns the Result; writes files when `out` is set.

    With `isolate` (the default) every implementation except the in-process float64 reference runs in a worker
    process (`pool`, a bughunt.worker.WorkerPool, may be shared across calls so libraries load once). Workers run
    side by side when their estimated peaks fit in memory (`max_memory` bytes, default what is available), one
    after another otherwise; a run that cannot fit is refused before anything starts. Traces stream to disk.
    With `require_comparison` (the CLI), a run in which no candidate could be compared raises BughuntError and
    writes nothing.
    With `weight_check` (--weight-check), every implementation that exposes its loaded parameters also checks them
    against the checkpoint (bughunt/weightcheck.py); the result names each relation and a finding per departure.
    With `inner`, implementations that can also capture the points inside each layer (layer.{i}.attn.q, .k, .scores,
    .probs, .out, layer.{i}.mlp.hidden), so a finding names the innermost point that departs first. With
    `isolate_layers` (--isolate), each candidate that can is run once more with every decoder layer fed the
    reference's input to that layer, so each layer's own error shows without the error it inherits.
    `text` (a bughunt.text.TextRequest) gives the input as text instead of `tokens`: the checkpoint's
    tokenizer turns it into the ids every implementation is fed, and result.json records both.
    With `generate` = N, every implementation also generates N tokens greedily through its own generation path and
    each candidate's tokens are compared with the reference's (bughunt.generation); `decode_config` changes config
    values on the candidates' one-token decoding steps only (a planted decode bug)."""
    checkpoint = Path(checkpoint)
    if out is not None:
        check_output_dir(out, "compare", [("the checkpoint", checkpoint)])
    if dtype not in DTYPES:
        raise BughuntError(f"unknown dtype '{dtype}'. Use one of: {', '.join(DTYPES)}.")
    if device not in DEVICES:
        raise BughuntError(f"unknown device '{device}'. Use one of: {', '.join(DEVICES)}.")
    if not floor_factor > 0:
        raise BughuntError(f"--floor-factor must be positive, got {floor_factor}.")
    positive(timeout, "--timeout", "seconds an implementation's worker may take per run")
    spec = load_spec(checkpoint)
    weights = validate_weights(checkpoint, spec, allow_pickle)
    tokens, encoded = resolve_input(checkpoint, spec, tokens, text)
    tokens = default_tokens(spec) if tokens is None else tokens
    if tokens.size == 0:
        raise BughuntError("no input tokens: pass at least one token id.")
    if tokens.min() < 0 or tokens.max() >= spec.vocab_size:
        raise BughuntError(f"token ids must lie in [0, {spec.vocab_size}) for this checkpoint (vocab_size); got [{tokens.min()}, {tokens.max()}].")
    from bughunt import generation

    generation.check_settings(generate, top_k, spec.vocab_size, spec.max_position_embeddings, tokens.shape[1])
    if decode_config:
        from bughunt.inputs.config import validate_decode_config
        from bughunt.spec import load_config

        if not generate:
            raise BughuntError("--decode-config changes the decoding steps of generation; add --generate N (or use bughunt decode).")
        decode_config = validate_decode_config(decode_config, load_config(checkpoint), str(checkpoint / "config.json"))
    choices, ref_choice = _choices(implementations, reference)
    if require_comparison and all(c.label == ref_choice.label for c in choices):
        raise BughuntError(f"nothing to compare: only the reference {ref_choice.label} was given. Add a candidate, e.g. --impl hf.")
    envs.prepare(choices, in_process=not isolate)  # create missing library-version environments; refuse an implementation whose one is missing

    from bughunt import memory
    from bughunt.worker import WorkerFailure, WorkerPool

    if device_map not in (None, "auto"):
        raise BughuntError(f"--device-map {device_map!r} is not supported; use --device-map auto.")
    impl_dtype_of = lambda c: c.dtype or ("fp64" if c.name == "reference" else dtype)  # noqa: E731
    schedule = memory.plan([memory.estimate(c.name, c.label, spec, impl_dtype_of(c), tokens.shape, device, device_map)
                            for c in choices], max_memory, tokens.shape[1], dtype, memory.forward_flops(spec, tokens.size))

    traces: dict[str, Trace] = {}
    floor_traces: dict[str, Trace] = {}
    isolated: dict[str, Trace] = {}
    generations: dict[str, generation.Generation] = {}
    generation_failures: dict[str, str] = {}
    entries = []
    own_pool = pool is None and isolate
    pool = pool or (WorkerPool() if isolate else None)
    scratch = tempfile.TemporaryDirectory(prefix="bughunt-traces-")
    paths: dict[str, dict] = {}  # implementation -> its own tokenizer path's ids for the text (bughunt/tokenizer_paths.py)

    def attempt(choice: ImplChoice, index: int) -> tuple[dict, Trace | None]:
        impl_dtype = impl_dtype_of(choice)
        in_process = not isolate or (choice.name == "reference" and choice.python is None)
        entry = {"label": choice.label, "name": choice.name, "dtype": impl_dtype, "device": device, "python": choice.python,
                 "isolation": "in-process" if in_process else "worker", "status": "ok", "error": None, "meta": {}}
        trace = None
        try:
            with progress.task(choice.label, unit="step") as bar:
                if choice is ref_choice and choice.name == "reference" and choice.python is None and impl_dtype == "fp64":
                    from reference_impls import steps

                    bar.update(stage="float64 + noise-floor passes", total=steps(spec), done=0)
                    trace, floors = run_reference_with_floors(choice, checkpoint, spec, device, tokens,
                                                              [impl_dtype_of(c) for c in choices if c is not ref_choice],
                                                              Path(scratch.name), branches, allow_pickle, bar.advance, inner)
                    floor_traces.update(floors)
                else:
                    bar.update(stage="loading and running" + ("" if in_process else " in its worker"))
                    trace = run_choice(choice, checkpoint, spec, impl_dtype, device, tokens, None if in_process else pool,
                                       Path(scratch.name) / f"trace{index}", branches, allow_pickle, timeout, device_map=device_map,
                                       check_weights=weight_check, inner=inner)
            entry["meta"] = trace.meta
            if generate:
                with progress.task(choice.label, unit="step") as bar:
                    bar.update(stage=f"generating {generate} tokens")
                    try:
                        generations[choice.label] = generation.generate_choice(
                            choice, checkpoint, spec, impl_dtype, device, tokens, generate, Path(scratch.name) / f"generation{index}",
                            None if in_process else pool, None if choice is ref_choice else decode_config, allow_pickle, timeout,
                            device_map, branches)
                    except (BughuntError, WorkerFailure) as e:
                        generation_failures[choice.label] = str(e)
        except BughuntError as e:
            entry.update(status="failed", error=str(e))
        except WorkerFailure as e:
            entry.update(status="failed", error=str(e))
            if getattr(e, "traceback", None):
                entry["traceback"] = e.traceback
        except Exception as e:  # a crash inside a library is a failure of that implementation, not of the run
            entry.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=8))
        return entry, trace

    try:
        try:
            # Jobs for one worker run in order; different workers (implementations, interpreters) run side by side
            # when the memory plan allows it, one after another otherwise.
            groups: dict[tuple, list[tuple[int, ImplChoice]]] = {}
            for i, choice in enumerate(choices):
                groups.setdefault((choice.name, envs.interpreter(choice)), []).append((i, choice))
            results: dict[int, tuple[dict, Trace | None]] = {}
            order: list[str] = []

            def tokenizer_path(choice: ImplChoice) -> None:
                """This implementation's own tokenizer path on the same text, in its own process (a finding if it differs)."""
                from bughunt.tokenizer_paths import encode_path, has_path, text_job

                key = choice.name + (f"@{choice.python}" if choice.python else "")
                if encoded is None or not has_path(choice.name) or key in paths:
                    return
                paths[key] = {}
                job = {"kind": "tokenize", "name": choice.name, "checkpoint": str(checkpoint.resolve()), "text": text_job(encoded)}
                try:
                    answer = (pool.run(choice.name, envs.interpreter(choice), job, timeout) if isolate
                              else encode_path(choice.name, checkpoint, job["text"]))
                    paths[key] = {"path": answer["path"], "rows": answer["rows"]}
                except (BughuntError, WorkerFailure) as e:
                    paths[key] = {"skipped": str(e)}
                except Exception as e:  # a library failing on the text is this path's result, not a crash of the run
                    paths[key] = {"skipped": f"{type(e).__name__}: {e}"}

            def run_group(items):
                tokenizer_path(items[0][1])
                for i, choice in items:
                    order.append(choice.label)
                    results[i] = attempt(choice, i)
                    if own_pool and not schedule.side_by_side:
                        pool.stop(choice.name, envs.interpreter(choice))  # its memory goes back before the next one starts

            parallel = max(1, min(len(groups), os.cpu_count() or 1)) if schedule.side_by_side else 1
            with ThreadPoolExecutor(max_workers=parallel) as executor:
                list(executor.map(run_group, groups.values()))
            for i in range(len(choices)):
                entry, trace = results[i]
                if trace is not None:
                    traces[entry["label"]] = trace
                entries.append(entry)
            if isolate_layers and ref_choice.label in traces:
                isolated = _run_isolated(choices, ref_choice, entries, traces[ref_choice.label], checkpoint, spec, dtype,
                                         impl_dtype_of, device, tokens, pool if isolate else None, Path(scratch.name),
                                         branches, allow_pickle, timeout, inner)
        finally:
            if own_pool:
                pool.close()
        result = _judge_and_report(checkpoint, spec, choices, ref_choice, entries, traces, tokens, dtype, device,
                                   floor_factor, branches, allow_pickle, Path(scratch.name),
                                   {**schedule.as_dict(), "order": order}, floor_traces, inner,
                                   isolated if isolate_layers else None)
        attach(result.data, encoded, paths)
        if generate:
            generation.attach(result.data, generations, generation_failures, ref_choice.label, generate, top_k, tokens.shape[1],
                              decode_config or {})
            result.data["command"] += f" --generate {generate}" + (f" --top-k {top_k}" if top_k != 5 else "") + "".join(
                f" --decode-config {k}={v}" for k, v in (decode_config or {}).items())
        if require_comparison and not result.comparisons:
            failed = "; ".join(f"{e['label']}: {(e['error'] or '').splitlines()[0][:300].rstrip('.')}" for e in entries if e["status"] != "ok")
            raise BughuntError(f"nothing could be compared: every candidate failed or was refused ({failed}). Nothing was written.")
        if weights.unexpected:  # every implementation ignores them, so the comparison stands; the mismatch is still reported
            result.findings.append({"severity": "warning", "kind": "weights", "implementation": None, "point": None,
                                    "message": "the weights hold tensors config.json does not describe, which no implementation "
                                               f"reads: {weights.describe_unexpected(spec.num_layers)}. Check that config.json "
                                               "belongs to these weights (bughunt lint lists them)."})
        if out is not None:
            save(result, Path(out), traces, render=render)
        return result
    finally:
        traces.clear()
        floor_traces.clear()
        isolated.clear()
        scratch.cleanup()


def _run_isolated(choices, ref_choice, entries, reference: Trace, checkpoint, spec, dtype, impl_dtype_of, device, tokens, pool,
                  scratch: Path, branches, allow_pickle, timeout, inner) -> dict[str, Trace]:
    """--isolate: each candidate that ran, run again with every decoder layer fed the reference's input to that layer.
    Records in each entry whether it was isolated (or why not); returns label -> isolated trace."""
    out = {}
    for index, choice in enumerate(choices):
        entry = next(e for e in entries if e["label"] == choice.label)
        if choice is ref_choice or entry["status"] != "ok":
            continue
        if not runner_class(choice.name).accepts_feed:
            reason = getattr(runner_class(choice.name), "feed_refusal", f"{choice.name} offers no seam to feed a decoder layer its input")
            entry["isolated_layers"] = {"status": "unsupported", "reason": reason}
            continue
        try:
            with progress.task(f"{choice.label} isolated", unit="step") as bar:
                bar.update(stage="each layer fed the reference's input")
                in_process = pool is None or (choice.name == "reference" and choice.python is None)
                out[choice.label] = run_choice(choice, checkpoint, spec, impl_dtype_of(choice), device, tokens, None if in_process else pool,
                                               scratch / f"isolated{index}", branches, allow_pickle, timeout, inner=inner, feed=reference)
            entry["isolated_layers"] = {"status": "ok"}
        except Exception as e:  # noqa: BLE001 - the accumulated comparison stands; the isolated one is reported missing
            entry["isolated_layers"] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
    return out


def unrepresentable_finding(label: str, causes: list[str], first: str | None, points: list[dict], dtype: str) -> dict:
    """A library that cannot represent the checkpoint was run with its own values: name the cause and what it measured
    ("the library fixes rms_norm_eps at 1e-06; the checkpoint says 0.01; departs at layer.0 by 3.1e-02 relative L2")."""
    if first is None:
        worst = max((p for p in points if p.get("rel_l2") is not None), key=lambda p: p.get("ratio_to_floor") or 0.0, default=None)
        measured = "stays within the noise floor on this input" + (
            f" (at most {worst['ratio_to_floor']:.1f}x the {dtype} floor, at {worst['point']})" if worst and worst.get("ratio_to_floor") else "")
    else:
        p = next(p for p in points if p["point"] == first)
        last = points[-1]
        measured = (f"departs at {first} by {p['rel_l2']:.2e} relative L2 ({p['ratio_to_floor']:.1f}x the {dtype} floor)"
                    + (f", {last['rel_l2']:.2e} at {last['point']}" if last.get("rel_l2") is not None and last is not p else ""))
    return {"severity": "warning" if first else "info", "kind": "unrepresentable", "implementation": label, "point": first,
            "message": f"{label} cannot represent this checkpoint and ran with the library's own values: "
                       f"{'; '.join(causes)}; {measured}"}


def _judge_and_report(checkpoint, spec, choices, ref_choice, entries, traces, tokens, dtype, device, floor_factor,
                      branches, allow_pickle, scratch: Path, schedule: dict, floor_traces: dict[str, Trace],
                      inner: bool = False, isolated: dict[str, Trace] | None = None) -> Result:
    ref_entry = next(e for e in entries if e["label"] == ref_choice.label)
    if ref_entry["status"] != "ok":
        raise BughuntError(f"the reference implementation {ref_choice.label} failed: {ref_entry['error']}")
    reference_trace = traces[ref_choice.label]

    fp64 = reference_trace if (ref_choice.name == "reference" and reference_trace.meta.get("dtype") == "fp64") else None
    floors = {}
    findings = []
    comparisons = []
    for entry in entries:
        if entry["label"] == ref_choice.label:
            continue
        if entry["status"] != "ok":
            findings.append({"severity": "error", "kind": "failure", "implementation": entry["label"], "point": None,
                             "message": f"{entry['label']} failed: {entry['error']}"})
            continue
        if entry["dtype"] not in floors:
            floors[entry["dtype"]] = noise_floor(checkpoint, spec, entry["dtype"], tokens, fp64, allow_pickle, scratch,
                                                 floor_traces.get(entry["dtype"]) if fp64 is not None else None, inner)
        floor = floors[entry["dtype"]]
        points, first = judge(compare_traces(traces[entry["label"]], reference_trace, tokens), floor, floor_factor)
        comparisons.append({"candidate": entry["label"], "reference": ref_choice.label, "dtype": entry["dtype"],
                            "points": points, "first_above_floor": first, "summary": _summary(points)})
        if isolated and entry["label"] in isolated:
            comparisons[-1]["isolated"] = _isolated(isolated[entry["label"]], reference_trace, floor, floor_factor)
            findings.append(_isolated_finding(entry["label"], comparisons[-1]["isolated"]))
        nonfinite = next((p for p in points if p.get("nonfinite")), None)
        if nonfinite:
            findings.append({"severity": "error", "kind": "nonfinite", "implementation": entry["label"], "point": nonfinite["point"],
                             "message": f"{entry['label']} produced {nonfinite['nonfinite']} NaN/Inf values, first at {nonfinite['point']}"})
        elif first:
            p = next(p for p in points if p["point"] == first)
            findings.append({"severity": "warning", "kind": "divergence", "implementation": entry["label"], "point": first,
                             "message": (f"{entry['label']} departs from {ref_choice.label} at {first}: relative L2 {p['rel_l2']:.2e} "
                                         f"is {p['ratio_to_floor']:.1f}x the {entry['dtype']} noise floor ({p['floor_rel_l2']:.1e})")})
        if entry["meta"].get("cannot_represent"):
            findings.append(unrepresentable_finding(entry["label"], entry["meta"]["cannot_represent"], first, points, entry["dtype"]))
        loss = next((p for p in points if p["point"] == "logits" and p.get("nll_above_floor")), None)
        if loss is not None and not nonfinite:
            at = loss.get("first_position_nll_above_floor")
            findings.append({"severity": "warning", "kind": "loss", "implementation": entry["label"], "point": "logits",
                             "message": (f"{entry['label']} changes the loss on the input: mean NLL {loss['nll']:.4f} vs "
                                         f"{loss['nll_reference']:.4f} nats/token under {ref_choice.label} (delta {loss['delta_nll']:+.2e}, "
                                         f"perplexity x{_ratio_text(loss.get('ppl_ratio'))}), {loss['delta_nll_ratio_to_floor']:.1f}x the "
                                         f"{entry['dtype']} floor ({loss['floor_delta_nll']:.1e})"
                                         + (f"; first above it predicting position {at + 1}" if at is not None else ""))})
    findings += weight_findings(entries)
    for note in spec.notes:
        findings.append({"severity": "info", "kind": "config", "implementation": None, "point": None, "message": note})

    data = {
        "schema": "bughunt.result",
        "schema_version": SCHEMA_VERSION,
        "kind": "compare",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": _command(checkpoint, choices, ref_choice, dtype, device, tokens, floor_factor)
                   + (" --inner" if inner else "") + (" --isolate" if isolated is not None else "")
                   + (" --weight-check" if any((e.get("meta") or {}).get("weight_check") for e in entries) else ""),
        "checkpoint": {"path": str(checkpoint), "spec": spec.to_dict()},
        "inputs": {"tokens": tokens.tolist()},
        "settings": {"dtype": dtype, "device": device, "reference": ref_choice.label, "floor_factor": floor_factor, "branches": branches,
                     "inner": inner, "isolate": isolated is not None},
        "schedule": schedule,
        "environment": environment(),
        "implementations": entries,
        "noise_floor": floors,
        "comparisons": comparisons,
        "findings": findings,
    }
    return Result(data)


def _isolated(trace: Trace, reference: Trace, floor: dict, factor: float) -> dict:
    """The comparison of a candidate whose every decoder layer was fed the reference's input: per point, judged against
    the same floor (the accumulated one, so conservative at depth); `layers_above_floor` lists the decoder layers whose
    own error rises above it."""
    points, first = judge(compare_traces(trace, reference), floor, factor)
    above = [p["point"] for p in points if p["above_floor"] and p["point"].startswith("layer.") and p["point"].count(".") == 1]
    return {"points": points, "first_above_floor": first, "layers_above_floor": above}


def _isolated_finding(label: str, iso: dict) -> dict:
    layers = iso["layers_above_floor"]
    if not layers:
        text = "no decoder layer departs on its own: any divergence is inherited from before the first layer or after the last"
    else:
        text = f"{'only ' if len(layers) == 1 else ''}{', '.join(layers)} depart{'s' if len(layers) == 1 else ''} on {'its' if len(layers) == 1 else 'their'} own"
    return {"severity": "info", "kind": "isolated", "implementation": label, "point": layers[0] if layers else None,
            "message": f"{label} with each decoder layer fed the reference's input (--isolate): {text}"
                       + (f"; first point above the floor in isolation: {iso['first_above_floor']}" if iso["first_above_floor"] else "") + "."}


def weight_findings(entries: list[dict]) -> list[dict]:
    """A finding for each implementation whose loaded parameters depart from the checkpoint (or could not be checked)."""
    out = []
    for entry in entries:
        wc = (entry.get("meta") or {}).get("weight_check")
        if not wc:
            continue
        if wc.get("error"):
            out.append({"severity": "info", "kind": "weights", "implementation": entry["label"], "point": None,
                        "message": f"{entry['label']}: the weight check could not run: {wc['error']}"})
        elif wc["rows"]:
            out.append({"severity": "warning", "kind": "weights", "implementation": entry["label"], "point": None,
                        "message": wc["summary"]})
    return out


def _ratio_text(r: float | None) -> str:
    return "inf" if r is None else f"{r:.6g}"


def _summary(points: list[dict]) -> dict:
    residual = [p for p in points if p.get("rel_l2") is not None]
    worst = max(residual, key=lambda p: p["rel_l2"], default=None)
    logits = next((p for p in points if p["point"] == "logits"), {})
    return {"max_rel_l2": worst["rel_l2"] if worst else None, "max_rel_l2_point": worst["point"] if worst else None,
            "logits_kl": logits.get("kl"), "logits_top1": logits.get("top1"), "delta_nll": logits.get("delta_nll"),
            "ppl_ratio": logits.get("ppl_ratio")}


def save(result: Result, out: Path, traces: dict[str, Trace] | None = None, render: bool = True) -> None:
    """Write result.json, traces and (when render) the plots and report.html into `out`, atomically."""
    from bughunt import report

    def write(tmp: Path) -> None:
        for label, trace in list((traces or {}).items()):
            stem = tmp / "traces" / _safe(label)
            traces[label] = trace.move(stem)  # a rename from the scratch folder, not a copy through memory
            for entry in result.data["implementations"]:
                if entry["label"] == label:
                    entry["trace"] = f"traces/{_safe(label)}.safetensors"
        (tmp / "result.json").write_text(result.to_json())
        if render:
            report.render(result, tmp)

    write_atomically(out, write, kind=result.kind, protect=[("the checkpoint", Path(result.data["checkpoint"]["path"]))])


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)


class _CallableModule(type(os)):
    """`bughunt.compare` is both this module and the API function: importing the module (which sets the package
    attribute `bughunt.compare` to it) must not break `bughunt.compare(checkpoint, ...)`."""

    def __call__(self, *args, **kwargs) -> Result:
        return compare(*args, **kwargs)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
