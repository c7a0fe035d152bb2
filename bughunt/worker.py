"""Worker processes: each implementation runs in its own process (optionally under another Python interpreter)
and returns its trace through a file. A crash, a hang (past its timeout) or a missing library in a worker is a
failure of that implementation, never of the run.

This is the parent's side; bughunt/worker_serve.py is the worker's. Protocol: the parent writes one JSON job per line to the worker's stdin; the worker answers one JSON line on a
private copy of its stdout (the worker's fd 1 is pointed at stderr, so library prints cannot corrupt it).
One worker per (implementation, interpreter) serves many jobs, so torch or JAX is imported once.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bughunt.interrupt import on_interrupt, requested

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TIMEOUT = 600.0
_LIVE: set["Worker"] = set()  # every worker process started and not yet closed


def stop_all_workers() -> None:
    """Kill every live worker process now (SIGINT/SIGTERM): threads waiting on them see EOF and return at once."""
    for w in list(_LIVE):
        try:
            w.proc.kill()
        except OSError:
            pass


on_interrupt(stop_all_workers)


class WorkerFailure(Exception):
    """An implementation's worker crashed, hung, or reported an error."""


class Worker:
    def __init__(self, name: str, python: str | None = None, env: dict[str, str] | None = None):
        self.name, self.python = name, python or sys.executable
        self.stderr = tempfile.NamedTemporaryFile(prefix=f"bughunt-worker-{name}-", suffix=".log", delete=False)
        child_env = {**os.environ, **(env or {})}
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), child_env.get("PYTHONPATH")]))
        try:
            self.proc = subprocess.Popen([self.python, "-m", "bughunt.worker_serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self.stderr, env=child_env, text=True, bufsize=1)
        except OSError as e:
            self.stderr.close()
            os.unlink(self.stderr.name)
            raise WorkerFailure(f"could not start worker with interpreter {self.python}: {e}") from None
        _LIVE.add(self)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # EOF: the worker exited

    def stderr_tail(self, n: int = 1500) -> str:
        try:
            return Path(self.stderr.name).read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    def fatal_error(self) -> str:
        """What a native library said as it aborted the process (a C++ exception's `what()`, a GGML_ASSERT), which a
        backtrace printed after it would otherwise push out of the tail."""
        import re

        try:
            text = Path(self.stderr.name).read_text(errors="replace")
        except OSError:
            return ""
        lines = [ln.strip() for ln in text.splitlines()
                 if re.search(r"terminate called|what\(\):|GGML_ASSERT|Fatal Python error|Segmentation fault", ln)]
        return " ".join(dict.fromkeys(lines))[:400]

    def call(self, job: dict, timeout: float) -> dict:
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the worker is gone; the read below reports how it exited
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise WorkerFailure(f"worker for {self.name} timed out after {timeout:g} s and was killed") from None
            if line is None:
                code = self.proc.wait()
                fatal = self.fatal_error()
                raise WorkerFailure(f"worker for {self.name} ({self.python}) exited with code {code} before answering"
                                    + (f": {fatal}" if fatal else "")
                                    + (f"; its last output:\n{self.stderr_tail()}" if self.stderr_tail() else ""))
            if line.startswith("{"):
                return json.loads(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.alive():
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self.proc.wait()
        _LIVE.discard(self)
        self.stderr.close()
        try:
            os.unlink(self.stderr.name)
        except OSError:
            pass


class WorkerPool:
    """Workers keyed by (implementation, interpreter), started on first use, closed with the pool."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT):
        self.timeout = timeout
        self.workers: dict[tuple[str, str | None], Worker] = {}

    def run(self, name: str, python: str | None, job: dict, timeout: float | None = None) -> dict:
        """Send one request (bughunt.jobs.to_wire) to the worker of (name, python), starting it when needed."""
        from bughunt.implementations import REGISTRY

        key = (name, python)
        worker = self.workers.get(key)
        if worker is None or not worker.alive():
            if worker is not None:
                worker.close()  # reap the dead one and remove its log
            if requested():
                raise WorkerFailure("the run was interrupted; no new worker is started")
            env = REGISTRY[name][2]
            worker = self.workers[key] = Worker(name, python, env)
            if requested():  # the signal came while it started: stop_all_workers may have missed it
                worker.kill()
        answer = worker.call(job, timeout or self.timeout)
        if not answer.get("ok"):
            failure = WorkerFailure(answer.get("error", "worker reported an unknown error"))
            failure.traceback = answer.get("traceback")
            raise failure
        return answer

    def stop(self, name: str, python: str | None) -> None:
        """Close one worker (its memory goes back to the OS); a later job for it starts a fresh one."""
        worker = self.workers.pop((name, python), None)
        if worker is not None:
            worker.close()

    def close(self) -> None:
        for w in self.workers.values():
            w.close()
        self.workers.clear()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
