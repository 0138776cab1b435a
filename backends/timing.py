"""Measuring a run: wall time per stage, peak memory, model evaluations.

CUDA work is asynchronous, so every stage boundary synchronises the device; otherwise
a stage would be charged for the kernels of the one before it.
"""

from __future__ import annotations

import contextlib
import contextvars
import resource
import sys
import time
from collections import defaultdict
from typing import Callable, Iterator, NamedTuple

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


# What one denoiser call did, for the evidence timeline (studio/evidence.py):
COMPUTED, PARTIAL, REUSED = "F", "P", "R"  # the whole network / part of it / an answer from a cache
_SEVERITY = {COMPUTED: 0, PARTIAL: 1, REUSED: 2}


class CallRecord(NamedTuple):
    """One forward of the counted module: its CFG branch (None: one call for every branch,
    or no guidance), what it computed, where the method knows them its blocks (one
    character per block or attention layer: '1' computed, '0' answered from a cache), and
    its batch size (a batched-CFG call that dropped the unconditional half is smaller)."""

    branch: str | None
    kind: str = COMPUTED
    blocks: str | None = None
    batch: int | None = None


_ACTIVE_COUNTER: contextvars.ContextVar["EvalCounter | None"] = contextvars.ContextVar("fastgen_eval_counter",
                                                                                       default=None)


def mark_call(kind: str, blocks: str | None = None) -> None:
    """File the denoiser call in progress (or just finished) as ``kind``; a no-op outside a
    counted run (a calibration pass, a warm-up outside ``Backend.run``). The one place a
    method says what a call computed: ``EvalCostMeter`` and the span cache call it, so no
    method file keeps a timeline of its own. A call keeps the strongest mark it got."""
    counter = _ACTIVE_COUNTER.get()
    if counter is None or not counter.records:
        return
    last = counter.records[-1]
    if _SEVERITY[kind] >= _SEVERITY[last.kind]:
        last = last._replace(kind=kind)
    if blocks is not None:
        last = last._replace(blocks=blocks)
    counter.records[-1] = last


class EvalCounter:
    """Counts forward calls of a module (the denoiser, the LM) with a removable hook, and
    keeps one ``CallRecord`` per call (``branch``: the CFG branch the call belongs to)."""

    def __init__(self, module: torch.nn.Module | None, branch: Callable[[], str | None] | None = None):
        self.module = module
        self.count = 0
        self.records: list[CallRecord] = []
        self._branch = branch
        self._handle = None
        self._token = None

    def _hook(self, _module, args, kwargs) -> None:
        self.count += 1
        tensor = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim()), None)
        self.records.append(CallRecord(self._branch() if self._branch is not None else None,
                                       batch=int(tensor.shape[0]) if tensor is not None else None))

    def __enter__(self) -> "EvalCounter":
        if self.module is not None:
            self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        self._token = _ACTIVE_COUNTER.set(self)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._token is not None:
            _ACTIVE_COUNTER.reset(self._token)
            self._token = None


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
