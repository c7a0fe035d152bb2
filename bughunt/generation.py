"""Greedy generation: each implementation generates N tokens after the input through its own generation path
(transformers' `generate` with its KV cache, keras-hub's `generate`, DeepMind gemma's sampler; the reference
recomputes the whole prefix each step), and each candidate's tokens are compared with the reference's: the first
step where they differ, and there the top-k containment check vLLM's model tests gate on (is each side's token
within the other's top-k log-probs?), the log-prob gaps and the reference's top-2 margin (a flip on a near-tie is
not a bug). Knows nothing about how a runner generates; runners provide `generate`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bughunt import envs, jobs
from bughunt.errors import BughuntError
from bughunt.findings import Finding

DEFAULT_TOP_K = 5
MAX_STEPS = 4096


@dataclass
class Generation:
    """What one implementation generated: token ids [batch, steps], the logits each step chose from
    [batch, steps, vocab] (float32), and how both were obtained."""

    label: str
    tokens: np.ndarray
    logits: np.ndarray
    path: str  # the generation path, in words
    logits_source: str  # where the per-step logits come from, in words

    def save(self, stem: Path) -> None:
        """<stem>.gen.safetensors (tokens, logits) and <stem>.gen.json (the rest), for a worker to hand back."""
        from safetensors.numpy import save_file

        save_file({"tokens": np.ascontiguousarray(self.tokens, dtype=np.int64),
                   "logits": np.ascontiguousarray(self.logits, dtype=np.float32)}, f"{stem}.gen.safetensors")
        Path(f"{stem}.gen.json").write_text(json.dumps({"label": self.label, "path": self.path, "logits_source": self.logits_source}))

    @classmethod
    def load(cls, stem: Path) -> "Generation":
        from safetensors.numpy import load_file

        arrays = load_file(f"{stem}.gen.safetensors")
        meta = json.loads(Path(f"{stem}.gen.json").read_text())
        return cls(meta["label"], arrays["tokens"], arrays["logits"], meta["path"], meta["logits_source"])


def check_settings(steps: int | None, top_k: int, vocab_size: int, max_positions: int | None, prompt_length: int) -> None:
    """Refuse generation settings that cannot work, before anything runs."""
    if steps is None:
        return
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise BughuntError(f"--generate must be a number of tokens between 1 and {MAX_STEPS}, e.g. --generate 16; got {steps!r}.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab_size:
        raise BughuntError(f"--top-k must be between 1 and the vocabulary size {vocab_size}, e.g. --top-k 5; got {top_k!r}.")
    if max_positions and prompt_length + steps > max_positions:
        raise BughuntError(f"the input ({prompt_length} tokens) plus --generate {steps} exceeds the model's {max_positions} positions "
                           "(max_position_embeddings). Generate fewer tokens or shorten the input.")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def recompute(run_logits, tokens: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy generation by recomputation: each step runs the whole prefix and takes the argmax of the last position.
    `run_logits(ids)` returns logits [batch, seq, vocab]. Returns (tokens [batch, steps], logits [batch, steps, vocab])."""
    seq = np.asarray(tokens, dtype=np.int64)
    chosen, logits = [], []
    for _ in range(steps):
        last = np.asarray(run_logits(seq)[:, -1], dtype=np.float64)
        nxt = last.argmax(-1)
        chosen.append(nxt)
        logits.append(last.astype(np.float32))
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    return np.stack(chosen, 1), np.stack(logits, 1)


def _rank(logprobs: np.ndarray, token: int) -> int:
    """0-based rank of `token` (ties counted in its favour)."""
    return int((logprobs > logprobs[token]).sum())


def compare_generations(cand: Generation, ref: Generation, top_k: int) -> dict:
    """Per row: the first step where the tokens differ and, there, the top-k containment check both ways, the
    log-prob gaps and the reference's top-2 margin. Before the first difference both sides conditioned on the same
    prefix, so their distributions at that step are comparable; after it they are not, and nothing is judged."""
    if cand.tokens.shape != ref.tokens.shape:
        raise BughuntError(f"{cand.label} generated {list(cand.tokens.shape)} tokens, the reference {list(ref.tokens.shape)}.")
    steps = cand.tokens.shape[1]
    rows = []
    for b in range(cand.tokens.shape[0]):
        diff = np.flatnonzero(cand.tokens[b] != ref.tokens[b])
        row: dict = {"first_diff": int(diff[0]) if diff.size else None}
        if diff.size:
            t = int(diff[0])
            c_tok, r_tok = int(cand.tokens[b, t]), int(ref.tokens[b, t])
            lp_c, lp_r = log_softmax(cand.logits[b, t]), log_softmax(ref.logits[b, t])
            top2 = np.sort(lp_r)[-2:]
            row.update({
                "step": t, "candidate_token": c_tok, "reference_token": r_tok,
                "candidate_rank_under_reference": _rank(lp_r, c_tok), "reference_rank_under_candidate": _rank(lp_c, r_tok),
                "reference_gap": float(lp_r[r_tok] - lp_r[c_tok]),  # how much less likely the reference finds the candidate's token
                "candidate_gap": float(lp_c[c_tok] - lp_c[r_tok]),
                "reference_margin": float(top2[1] - top2[0]),  # the reference's own top-2 margin there
            })
            row["candidate_in_reference_topk"] = row["candidate_rank_under_reference"] < top_k
            row["reference_in_candidate_topk"] = row["reference_rank_under_candidate"] < top_k
            row["topk_ok"] = row["candidate_in_reference_topk"] and row["reference_in_candidate_topk"]
        else:
            row["topk_ok"] = True
        rows.append(row)
    firsts = [r["first_diff"] for r in rows if r["first_diff"] is not None]
    return {"candidate": cand.label, "path": cand.path, "logits_source": cand.logits_source, "tokens": cand.tokens.tolist(),
            "rows": rows, "first_diff": min(firsts) if firsts else None,
            "matched_steps": min(firsts) if firsts else steps,  # tokens equal to the reference's before any difference
            "topk_ok": float(np.mean([r["topk_ok"] for r in rows]))}


def margins(gen: Generation) -> list[list[float]]:
    """Each step's top-2 log-prob margin (nats): how close that step came to a tie."""
    out = []
    for row in gen.logits:
        lp = log_softmax(row)
        top2 = np.sort(lp, axis=-1)[:, -2:]
        out.append([float(v) for v in top2[:, 1] - top2[:, 0]])
    return out


def record(ref: Generation, comparisons: list[dict], steps: int, top_k: int, prompt_length: int, decode_config: dict,
           failures: dict[str, str]) -> dict:
    """The `generation` section of a Result."""
    return {"steps": steps, "top_k": top_k, "prompt_length": prompt_length, "decode_config": decode_config,
            "reference": {"label": ref.label, "path": ref.path, "tokens": ref.tokens.tolist(), "margins": margins(ref)},
            "candidates": comparisons, "failed": failures}


def findings(section: dict) -> list[dict]:
    """One finding per candidate whose generated tokens differ from the reference's."""
    out = []
    ref = section["reference"]["label"]
    for c in section["candidates"]:
        rows = [r for r in c["rows"] if r["first_diff"] is not None]
        if not rows:
            continue
        r = min(rows, key=lambda r: r["first_diff"])
        contained = all(x["topk_ok"] for x in rows)
        k = section["top_k"]
        where = (f"at step {r['step']}: {c['candidate']} chose token {r['candidate_token']} (rank {r['candidate_rank_under_reference'] + 1} "
                 f"under {ref}, {r['reference_gap']:.3g} nats below its choice {r['reference_token']}; "
                 f"the reference's top-2 margin there {r['reference_margin']:.3g} nats)")
        if contained:
            message = (f"{c['candidate']}'s greedy generation departs from {ref}'s {where}; each token is within the other's "
                       f"top-{k}, which the top-k check allows (a near-tie flip, not by itself a bug)")
        else:
            message = (f"{c['candidate']}'s greedy generation departs from {ref}'s {where}; a token lies outside the other's "
                       f"top-{k}: the generation paths disagree beyond a near tie")
        out.append(Finding("info" if contained else "warning", "generation", message, c["candidate"], "logits").to_dict())
    return out


@dataclass(frozen=True)
class GenerateJob:
    """Greedy generation of `steps` tokens after `tokens` through the implementation's own path; the Generation comes
    back through the files at `stem`. `decode_config` changes config values on the one-token steps only."""

    kind = "generate"
    tokens: np.ndarray
    steps: int
    stem: Path
    decode_config: dict | None = None

    def to_wire(self) -> dict:
        return {"tokens": np.asarray(self.tokens).tolist(), "steps": self.steps, "stem": str(self.stem),
                "decode_config": self.decode_config or {}}

    @classmethod
    def from_wire(cls, d: dict) -> "GenerateJob":
        return cls(np.asarray(d["tokens"]), int(d["steps"]), Path(d["stem"]), d["decode_config"] or None)

    def answer(self, runner) -> dict:
        runner.generate(self.tokens, self.steps, self.decode_config).save(self.stem)
        return {"generation": str(self.stem)}


jobs.register(jobs.Kind("generate", GenerateJob.from_wire))


def generate_choice(load: jobs.Load, job: GenerateJob, pool=None, timeout: float | None = None) -> Generation:
    """One implementation's greedy generation: in this process when `pool` is None or it runs in the main process,
    otherwise as a job for its worker (which reuses the runner it holds from the trace job)."""
    if pool is None or load.choice.in_main_process:
        with load.open(branches=False) as runner:
            return runner.generate(job.tokens, job.steps, job.decode_config)
    pool.run(load.choice.name, envs.interpreter(load.choice), jobs.to_wire(load, job), timeout)
    return Generation.load(job.stem)


def attach(result_data: dict, generations: dict, failures: dict[str, str], ref_label: str, steps: int, top_k: int,
           prompt_length: int, decode_config: dict) -> None:
    """Put the generation section, its findings, and each candidate's generation metrics on its logits point
    (gen_matched_steps, gen_topk_ok: what ci thresholds judge) into a compare Result's data."""
    ref = generations.get(ref_label)
    if ref is None:
        result_data["generation"] = {"steps": steps, "top_k": top_k, "prompt_length": prompt_length, "decode_config": decode_config,
                                     "reference": None, "candidates": [], "failed": failures}
        result_data["findings"].append(Finding("error", "generation", f"the reference {ref_label} could not generate: "
                                               f"{failures.get(ref_label, 'no result')}", ref_label).to_dict())
        return
    comps = []
    for c in result_data["comparisons"]:
        gen = generations.get(c["candidate"])
        if gen is None:
            continue
        g = compare_generations(gen, ref, top_k)
        comps.append(g)
        logits = next((p for p in c["points"] if p["point"] == "logits"), None)
        if logits is not None:
            logits["gen_matched_steps"] = g["matched_steps"]
            logits["gen_topk_ok"] = g["topk_ok"]
    section = record(ref, comps, steps, top_k, prompt_length, decode_config, failures)
    result_data["generation"] = section
    result_data["findings"].extend(findings(section))
    for label, error in failures.items():
        result_data["findings"].append(Finding("error", "generation", f"{label} could not generate: {error}", label).to_dict())
