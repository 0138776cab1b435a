"""Stopping a run from outside: cancel tokens, time limits, and telling OOM from other errors.

A run cannot be interrupted safely from another thread (Gradio's cancel only stops
waiting for it), so stopping is cooperative: every run carries a ``CancelToken`` and the
backend checks it before every model evaluation and at every progress report (each
denoising step, each streamed token). Setting the token from anywhere (a Cancel button,
a closed client connection, the time limit) makes the run raise ``RunCancelled`` at its
next check; the backend's ``finally`` blocks then remove every method as usual, so the
model's next run is normal.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from backends.types import StudioError

ProgressFn = Callable[[int, int, str], None]


class RunCancelled(StudioError):
    """The run was stopped before it finished; nothing was kept but its history row."""

    status = "cancelled"


class RunTimedOut(RunCancelled):
    """The run went past the per-request time limit and was stopped at its next step."""

    status = "timeout"


class CancelToken:
    """A per-run stop flag with an optional time limit.

    ``cancel(reason)`` may be called from any thread, any number of times (the first
    reason wins); a token with a ``parent`` is also stopped when the parent is set (one
    Cancel for a whole comparison, one time limit per run). ``start()`` begins the time limit: the backend calls it once it holds
    the model, so time spent waiting in the queue is not charged to the run. ``is_set``
    makes a token usable where a ``threading.Event`` is expected (between-run checks).
    """

    def __init__(self, time_limit_s: float | None = None, parent=None):
        self.time_limit_s = time_limit_s if time_limit_s and time_limit_s > 0 else None
        self.deadline: float | None = None
        self.reason: str | None = None
        self.parent = parent  # anything with is_set(): a caller's token or threading.Event
        self._event = threading.Event()

    def cancel(self, reason: str = "cancelled by the user") -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    set = cancel  # threading.Event's spelling

    def is_set(self) -> bool:
        if not self._event.is_set() and self.parent is not None and self.parent.is_set():
            self.cancel(getattr(self.parent, "reason", None) or "cancelled by the user")
        return self._event.is_set()

    def start(self) -> None:
        if self.time_limit_s is not None and self.deadline is None:
            self.deadline = time.monotonic() + self.time_limit_s

    def check(self) -> None:
        """Raise if the run must stop now: cancelled, or past its time limit."""
        if self.is_set():
            raise RunCancelled(f"the run was cancelled: {self.reason}")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise RunTimedOut(f"the run went over the time limit of {self.time_limit_s:g} s (--time-limit) "
                              "and was stopped")

    def guard(self, progress: ProgressFn | None) -> ProgressFn:
        """A progress callback that checks the token first, then reports."""

        def report(done: int, total: int, stage: str) -> None:
            self.check()
            if progress is not None:
                progress(done, total, stage)

        return report

    def check_hook(self, *_args) -> None:
        """A forward pre-hook: a model evaluation never starts on a stopped run."""
        self.check()


def cancel_after(token: CancelToken) -> threading.Timer | None:
    """Set ``token`` once its time limit has passed, for work that polls ``is_set`` between
    runs (a tune's trials) and so never reaches ``check``'s deadline; None without a limit.
    The caller cancels the timer when the work ends."""
    if token.time_limit_s is None:
        return None
    token.start()
    timer = threading.Timer(token.time_limit_s, token.cancel,
                            args=(f"it went over the time limit of {token.time_limit_s:g} s (--time-limit)",))
    timer.daemon = True
    timer.start()
    return timer


ALLOCATION_FAILURE_MARKERS = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "defaultcpuallocator",
    "failed to allocate",
    "not enough memory",
)


def is_allocation_failure(exc: BaseException) -> bool:
    """True for an out-of-memory failure on any device: ``torch.OutOfMemoryError`` (CUDA),
    ``MemoryError`` (Python), or a RuntimeError from an allocator (CPU's
    "DefaultCPUAllocator: can't allocate memory", MPS's "out of memory")."""
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(marker in text for marker in ALLOCATION_FAILURE_MARKERS)
    return False
