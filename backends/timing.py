"""Measuring a run: wall time per stage, peak memory, model evaluations.

CUDA work is asynchronous, so every stage boundary synchronises the device; otherwise
a stage would be charged for the kernels of the one before it.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections import defaultdict
from typing import Iterator

import torch


def synchronize(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


class StageTimer:
    """Accumulates wall time per named stage; nested stages are charged to both."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[name] += time.perf_counter() - start

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in self.seconds.items()}


def _rss_high_water_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class PeakMemory:
    """Peak memory during a block: CUDA allocator peak on GPU, process RSS peak on CPU.

    The RSS high-water mark is per process and never goes down, so on CPU the figure is
    the process peak reached by the end of the block (an upper bound for the block).
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device or "cpu")
        self.peak_bytes = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.peak_bytes = _rss_high_water_bytes()


class EvalCounter:
    """Counts forward calls of a module (the denoiser, the LM) with a removable hook."""

    def __init__(self, module: torch.nn.Module | None):
        self.module = module
        self.count = 0
        self._handle = None

    def _hook(self, *_args) -> None:
        self.count += 1

    def __enter__(self) -> "EvalCounter":
        if self.module is not None:
            self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


@contextlib.contextmanager
def timed_method(obj: object, attr: str, timer: StageTimer, stage: str) -> Iterator[None]:
    """Charge every call of ``obj.attr`` (a text encoder's forward, ``vae.decode``) to
    ``stage``, by shadowing the bound method on the instance for the block's duration."""
    if obj is None or not hasattr(obj, attr):
        yield
        return
    original = getattr(obj, attr)
    had_instance_attr = attr in vars(obj)

    def timed(*args, **kwargs):
        with timer.stage(stage):
            return original(*args, **kwargs)

    setattr(obj, attr, timed)
    try:
        yield
    finally:
        if had_instance_attr:
            setattr(obj, attr, original)
        else:
            delattr(obj, attr)
