"""Live progress lines on stderr for long runs: one line per task (an implementation's forward pass, a sweep's
settings, a CI matrix's cells) saying what it is doing, how far it is, and an ETA. Drawn by tqdm.

    from bughunt import progress

    with progress.task("hf:bf16", total=spec.num_layers, unit="layer") as t:
        t.update(stage="loading")          # what the task is doing now (shown before the bar)
        ...
        t.update(stage="forward")
        for i in range(spec.num_layers):
            ...                            # layer i
            t.advance()                    # one more unit done; t.advance(n) for n
        t.update(stage="comparing", total=len(points), done=0)   # a new count: restart the bar

Text printed while lines are live would land in the middle of them; print through `progress.printer(print)`
(or any print-like function), which takes the lines down while it writes and draws them again after.

`task(name, total=None, unit="step")`: `total=None` when the count is not known yet (the line shows a count and
a rate, no ETA); `update(total=...)` sets it once known. `update(done=k)` sets the count to k; `done=0` also restarts the clock, so the rate and ETA describe the new count.

When lines are shown, decided once per task when it starts:
- `BUGHUNT_PROGRESS=1` shows them whatever stderr is (for tests), `BUGHUNT_PROGRESS=0` never;
- otherwise only when stderr is a terminal and the `CI` environment variable is unset (CI systems set it).
When not shown, `task` returns one shared object whose methods do nothing, and tqdm is not even imported.

Several tasks may be open at once, one per thread (compare runs implementations side by side in threads):
each gets its own line, and every call takes tqdm's write lock, so a task may also be shared between threads.
A finished task's line is erased, so the terminal ends with the command's own output.
"""

from __future__ import annotations

import functools
import io
import os
import sys
import threading
from typing import IO, Any, Callable

_live = 0  # tasks drawing a line now
_live_lock = threading.Lock()


def enabled(stream: IO[str] | None = None) -> bool:
    """Whether a task started now, drawing on `stream` (default: stderr), shows its line."""
    forced = os.environ.get("BUGHUNT_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if os.environ.get("CI"):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


_UNCOUNTED = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}]"  # the line while the total is not known


def _columns(stream: IO[str]) -> int | None:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):  # not a terminal, or no file descriptor
        return None


class Task:
    """One live line: a name, the current stage, a bar of `total` units with an ETA. Use as a context manager."""

    def __init__(self, name: str, total: int | None, unit: str, stream: IO[str]):
        from tqdm import tqdm

        global _live
        self._name = name
        self._closed = False
        self._lock = tqdm.get_lock()
        with _live_lock:
            _live += 1
        with self._lock:
            sized = _columns(stream) != 0  # a terminal of 0 columns (a pty nobody sized) would show an empty line
            self._bar = tqdm(total=total, unit=unit, desc=name, bar_format=None if total else _UNCOUNTED, file=stream, leave=False, dynamic_ncols=sized,
                             ncols=None if sized else 100, nrows=None if sized else 20, mininterval=0.2)

    def update(self, stage: str | None = None, total: int | None = None, done: int | None = None) -> None:
        with self._lock:
            if total is not None:
                self._bar.total = total
                self._bar.bar_format = None if total else _UNCOUNTED
            if done == 0:
                self._bar.reset(total=self._bar.total)  # a new count: its rate and ETA start now
            elif done is not None:
                self._bar.n = done
            if stage is not None:
                self._bar.set_description_str(f"{self._name} {stage}", refresh=False)
            self._bar.refresh()

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self._bar.update(n)

    def close(self) -> None:
        global _live
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._bar.close()
        with _live_lock:
            _live -= 1

    def __enter__(self) -> "Task":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Off:
    """The task when lines are not shown: every call does nothing."""

    def update(self, stage: str | None = None, total: int | None = None, done: int | None = None) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Off":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


OFF = _Off()


def task(name: str, total: int | None = None, unit: str = "step", stream: IO[str] | None = None) -> Task | _Off:
    """A live line for one piece of work (see the module docstring); `stream` defaults to stderr at call time."""
    stream = sys.stderr if stream is None else stream
    if not enabled(stream):
        return OFF
    return Task(name, total, unit, stream)


def printer(print_fn: Callable[..., Any]) -> Callable[..., Any]:
    """`print_fn` wrapped so that, while any line is live, the lines are taken down as it writes and drawn again after."""

    @functools.wraps(print_fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not _live:
            return print_fn(*args, **kwargs)
        from tqdm import tqdm

        with tqdm.external_write_mode():
            return print_fn(*args, **kwargs)

    return wrapped
