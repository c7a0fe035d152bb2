"""The tokenizer-path probe (on whenever the input is text): each implementation's own tokenizer path tokenizes the
same text in its worker (its interpreter, its library versions), once per implementation, before its traces; a
difference from the ids every implementation was fed is a finding, reported before any numerics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bughunt import envs, jobs
from bughunt.errors import BughuntError
from bughunt.findings import Finding
from bughunt.probes import Probe, ProbeOptions


@dataclass(frozen=True)
class TokenizeJob:
    """Tokenize `text` (bughunt.tokenizer_paths.text_job) through implementation `name`'s own path; needs no model."""

    kind = "tokenize"
    name: str
    checkpoint: Path
    text: dict

    def to_wire(self) -> dict:
        return {"name": self.name, "checkpoint": str(Path(self.checkpoint).resolve()), "text": self.text}

    @classmethod
    def from_wire(cls, d: dict) -> "TokenizeJob":
        return cls(d["name"], Path(d["checkpoint"]), d["text"])

    def answer(self, runner=None) -> dict:
        from bughunt.tokenizer_paths import encode_path

        return encode_path(self.name, self.checkpoint, self.text)


jobs.register(jobs.Kind("tokenize", TokenizeJob.from_wire, needs_runner=False))


def tokenize(pool, job: TokenizeJob, python: str | None = None, timeout: float | None = None) -> dict:
    """Run a tokenize job in the worker of its implementation (`pool`), or here when `pool` is None."""
    if pool is None:
        return job.answer()
    return pool.run(job.name, python, jobs.to_wire(None, job), timeout)


class Options(ProbeOptions):
    pass


class TokenizerPath(Probe):
    name = "tokenizer_path"
    Options = Options

    def enabled(self, options: Options) -> bool:
        return True  # it acts only when the input is text

    def before(self, ctx, choice) -> None:
        from bughunt.tokenizer_paths import has_path, text_job
        from bughunt.worker import WorkerFailure

        paths = ctx.records.setdefault(self.name, {})
        key = choice.name + (f"@{choice.python}" if choice.python else "")
        if ctx.plan.encoded is None or not has_path(choice.name) or key in paths:
            return
        paths[key] = {}
        job = TokenizeJob(choice.name, ctx.plan.checkpoint, text_job(ctx.plan.encoded))
        pool = ctx.pool if ctx.plan.options.isolate else None
        try:
            answer = tokenize(pool, job, envs.interpreter(choice), ctx.plan.options.timeout)
            paths[key] = {"path": answer["path"], "rows": answer["rows"]}
        except (BughuntError, WorkerFailure) as e:
            paths[key] = {"skipped": str(e)}
        except Exception as e:  # a library failing on the text is this path's result, not a crash of the run
            paths[key] = {"skipped": f"{type(e).__name__}: {e}"}

    def attach(self, data: dict, ctx) -> list[Finding]:
        from bughunt.text import attach

        attach(data, ctx.plan.encoded, ctx.records.get(self.name, {}))  # its findings go first, before the numerics
        return []


PROBE = TokenizerPath()
