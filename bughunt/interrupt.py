"""Interruption: SIGINT and SIGTERM stop the run cleanly. The handler stops every worker process at once (so threads
waiting on them return), then raises `Interrupted` in the main thread, so every `finally` removes its temporary
folders on the way out; the CLI exits 130 (SIGINT) or 143 (SIGTERM). Short critical sections (moving a finished
output into place, removing a temporary folder) defer the signal until they are done, so no output is ever half
moved."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

_stoppers: list[Callable[[], None]] = []
_deferring = 0
_pending: int | None = None
_requested = False


class Interrupted(BaseException):
    """Raised in the main thread when SIGINT or SIGTERM arrives. A BaseException, so `except Exception` in the
    run loop cannot swallow it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def on_interrupt(stop: Callable[[], None]) -> None:
    """Register a function that stops background work (e.g. kills worker processes); it must be quick and safe to
    call from a signal handler."""
    _stoppers.append(stop)


def _stop_background() -> None:
    for stop in list(_stoppers):
        try:
            stop()
        except Exception:  # noqa: BLE001 - a stopper that fails must not keep the others from running
            pass


def requested() -> bool:
    """Whether SIGINT/SIGTERM arrived during this command: nothing new (a worker, a job) should start."""
    return _requested


def _handle(signum, frame) -> None:
    global _pending, _requested
    _requested = True
    _stop_background()
    if _deferring:
        _pending = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold back SIGINT/SIGTERM while the block runs; raise the held signal as Interrupted when it ends."""
    global _deferring, _pending
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending is not None:
            signum, _pending = _pending, None
            raise Interrupted(signum)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Install the handlers for the duration of a command (main thread only; elsewhere a no-op), then put the
    previous handlers back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _requested
    previous = {s: signal.signal(s, _handle) for s in (signal.SIGINT, signal.SIGTERM)}
    _requested = False
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _requested = False
