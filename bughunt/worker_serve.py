"""The worker's side of bughunt/worker.py (`python -m bughunt.worker_serve`): read one JSON job per line, answer it
with the implementation's runner, write one JSON line back. The last runner stays open, so a sweep's next setting that
differs only in live toggles needs no reload. Job kinds come from bughunt/jobs.py (probes register theirs)."""

from __future__ import annotations

import json
import os
import sys
import traceback

from bughunt import jobs, probes  # noqa: F401 - importing the probes registers their job kinds
from bughunt.errors import BughuntError


class Held:
    """The runner kept open between jobs, keyed by what it loaded."""

    def __init__(self):
        self.key: str | None = None
        self.runner = None

    def runner_for(self, load: jobs.Load):
        """The open runner for a load: the held one, switched to the load's toggles, when only live toggles differ.
        Returns (runner, reused)."""
        key = load.identity()
        if self.runner is not None and self.key == key and self.runner.retoggle(load.all_toggles):
            self.runner.label = load.label or load.choice.label
            return self.runner, True
        self.release()
        runner = load.open()
        runner.open()
        self.key, self.runner = key, runner
        return runner, False

    def release(self) -> None:
        if self.runner is not None:
            runner, self.runner, self.key = self.runner, None, None
            runner.close()


def answer(request: dict, held: Held) -> dict:
    """One job's answer: {"ok": True, ...} or raises."""
    kind = jobs.KINDS[request["kind"]]
    job = kind.read(request["job"])
    if not kind.needs_runner:
        return {"ok": True, **job.answer(None)}
    load = jobs.Load.from_wire(request["load"])
    runner, reused = held.runner_for(load)
    if isinstance(job, jobs.TraceJob):
        return {"ok": True, **job.answer(runner, {"python": sys.executable, "pid": os.getpid(), "reused_loaded_model": reused})}
    return {"ok": True, **job.answer(runner)}


def serve() -> None:
    """The worker's main loop."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the protocol
    sys.stdout = sys.stderr
    probes.registered()  # imports every probe, registering its job kinds
    held = Held()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = answer(json.loads(line), held)
        except BughuntError as e:
            held.release()
            reply = {"ok": False, "error": str(e)}
        except Exception as e:  # noqa: BLE001 - reported to the parent as this implementation's failure
            held.release()
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
        protocol.write(json.dumps(reply) + "\n")
        protocol.flush()
    held.release()


if __name__ == "__main__":
    serve()
