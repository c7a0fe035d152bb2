"""Run a command and measure it the way a user's machine feels it: wall time and the peak resident memory summed
over the whole process tree (workers included), polled every ~50 ms. A guard kills the tree before it can reach
the kernel's OOM killer (its own RSS above a limit, or the machine's available memory below a floor), and the
result says so instead of crashing."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

GB = 1e9


@dataclass
class Measurement:
    command: list[str]
    status: str  # ok | failed | exceeded | low-memory | timeout | killed
    message: str  # one line: "ok", "exceeded 22 GB", "exit 2", "killed by SIGKILL (the kernel's OOM killer?)"
    exit_code: int | None
    wall_s: float
    peak_rss_bytes: int  # max over time of the RSS summed over the live tree
    peak_anon_bytes: int  # the same for RSS minus file-backed and shared pages (mmap'd weights are not counted)
    peak_processes: int
    load_average: tuple[float, float] = (0.0, 0.0)  # the machine's 1-minute load at start and at end (shared machines)
    stdout: str = ""
    stderr_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return asdict(self)


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def tree_memory(proc: psutil.Process) -> tuple[int, int, int]:
    """(RSS, anonymous RSS, process count) summed over `proc` and its live descendants."""
    rss = anon = count = 0
    for p in _tree(proc):
        try:
            mem = p.memory_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        rss += mem.rss
        anon += max(0, mem.rss - getattr(mem, "shared", 0))
        count += 1
    return rss, anon, count


def _kill_tree(proc: psutil.Process) -> None:
    """SIGKILL the process, every descendant, and what is left of its process group (it runs in its own session)."""
    for p in reversed(_tree(proc)):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def measure(command: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None,
            max_rss_gb: float | None = None, min_available_gb: float | None = None, timeout_s: float | None = None,
            interval_s: float = 0.05) -> Measurement:
    """Run `command` to completion (or until a guard stops it) and return its Measurement. stdout is kept whole,
    stderr's last 2000 characters."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        load_start = os.getloadavg()[0]
        start = time.perf_counter()
        popen = subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                 start_new_session=True)
        proc = psutil.Process(popen.pid)
        peak_rss = peak_anon = peak_count = 0
        stopped: tuple[str, str] | None = None
        try:
            while popen.poll() is None:
                rss, anon, count = tree_memory(proc)
                peak_rss, peak_anon, peak_count = max(peak_rss, rss), max(peak_anon, anon), max(peak_count, count)
                if max_rss_gb is not None and rss > max_rss_gb * GB:
                    stopped = ("exceeded", f"exceeded {max_rss_gb:g} GB (tree RSS {rss / GB:.1f} GB); killed by the benchmark's guard")
                elif min_available_gb is not None and psutil.virtual_memory().available < min_available_gb * GB:
                    stopped = ("low-memory", f"the machine's available memory fell below {min_available_gb:g} GB "
                                             f"(tree RSS {rss / GB:.1f} GB); killed by the benchmark's guard")
                elif timeout_s is not None and time.perf_counter() - start > timeout_s:
                    stopped = ("timeout", f"still running after {timeout_s:g} s; killed by the benchmark's guard")
                if stopped:
                    _kill_tree(proc)
                    break
                time.sleep(interval_s)
        finally:
            if popen.poll() is None and stopped is None:  # interrupted (Ctrl-C): leave nothing running
                _kill_tree(proc)
            code = popen.wait()
            wall = time.perf_counter() - start
            try:  # descendants that outlived their parent stay in its process group
                os.killpg(popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            out.seek(0)
            err.seek(0)
            stdout = out.read().decode(errors="replace")
            stderr_tail = err.read().decode(errors="replace")[-2000:]
    if stopped:
        status, message = stopped
    elif code == 0:
        status, message = "ok", "ok"
    elif code in (-signal.SIGKILL, 128 + signal.SIGKILL):
        status, message = "killed", f"killed by SIGKILL (exit {code}): the kernel's OOM killer, or another process"
    elif code < 0:
        status, message = "killed", f"killed by signal {signal.Signals(-code).name}"
    else:
        status, message = "failed", f"exit {code}"
    return Measurement(list(map(str, command)), status, message, code, wall, peak_rss, peak_anon, peak_count,
                       (load_start, os.getloadavg()[0]), stdout, stderr_tail)
