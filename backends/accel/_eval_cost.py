"""What a caching method saved, in time: the measured cost of a full vs a partial evaluation.

A caching or skipping method answers some denoiser calls in part (DeepCache's shallow
branch, a cached block span, the check TeaCache still runs before skipping the blocks).
Counting skipped calls says nothing about time: a "skipped" call that still runs half the
network saves half. ``EvalCostMeter`` times every denoiser call with a monotonic clock
(two forward hooks; on CUDA the device is synchronised at each end so a call is charged
its own kernels) and files it as full or partial, as the method says while the call runs.
From the two costs:

    ideal (denoising loop) = (F + P) * t_full / (F * t_full + P * t_partial)

the speedup the method could give if nothing but its skipped work were saved. A run's
stats also carry the seconds spent in those calls, so the measurement engine can extend
the ideal to the whole run (Amdahl: text encoding, VAE decoding and the scheduler are not
denoiser calls and are not sped up) and report efficiency = measured / ideal.

One meter per run, shared by every method that skips (no per-method timing code). Its
marks also go to the run's call records (``backends.timing.mark_call``): the per-step
timeline of what each call computed, partially computed or reused.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from backends.timing import PARTIAL, REUSED, mark_call, synchronize


def ideal_speedup(full_calls: int, partial_calls: int, full_cost: float, partial_cost: float) -> float | None:
    """``(F + P) t_full / (F t_full + P t_partial)``; None without a measured full call
    (nothing to weigh a partial call against). A method that never skipped gets 1.0."""
    if full_calls + partial_calls == 0:
        return None
    if partial_calls == 0:
        return 1.0
    if full_calls == 0 or full_cost <= 0:
        return None
    return (full_calls + partial_calls) * full_cost / (full_calls * full_cost + partial_calls * partial_cost)


def end_to_end_ideal(stats: dict[str, Any], total_seconds: float) -> float | None:
    """The ideal over the whole run from one method's stats and the run's wall time: the
    time outside the metered denoiser calls is kept, each partial call is charged a full
    one. None when the stats carry no cost figures."""
    needed = ("evals_full", "evals_partial", "full_eval_s", "partial_eval_s")
    if not stats or any(stats.get(k) is None for k in needed) or total_seconds <= 0:
        return None
    full, partial = stats["evals_full"], stats["evals_partial"]
    if full == 0:
        return None if partial else 1.0
    per_full = stats.get("full_eval_ms", 1000 * stats["full_eval_s"] / full) / 1000
    metered = stats["full_eval_s"] + stats["partial_eval_s"]
    outside = max(0.0, total_seconds - metered)
    return (outside + (full + partial) * per_full) / total_seconds


def run_ideal(method_stats: dict[str, dict[str, Any]], total_seconds: float) -> float | None:
    """One run's end-to-end ideal, when every method of the run reported cost figures.
    A method without them (a sampler with fewer steps, CFG truncation, ToMe, compile)
    changes the work in ways these costs do not see, and the ideal would be measured
    against the wrong baseline: then there is none. (Two metered methods never share a
    run: the DiT caches exclude each other and DeepCache is UNet-only; were they to, the
    larger ideal is a lower bound of their joint one.)"""
    if not method_stats:
        return None
    ideals = [end_to_end_ideal(stats, total_seconds) if isinstance(stats, dict) else None
              for stats in method_stats.values()]
    if any(i is None for i in ideals):
        return None
    return max(ideals)


class EvalCostMeter:
    """Times every forward of ``module``; ``mark_partial()`` during a call files it as partial.

    >>> meter = EvalCostMeter(pipe.unet)
    >>> ...  # the method calls meter.mark_partial() inside the calls it answers in part
    >>> meter.remove(); meter.stats()["ideal_speedup"]
    """

    def __init__(self, module: torch.nn.Module):
        self.device = next(module.parameters(), torch.empty(0)).device
        self.full: list[float] = []
        self.partial: list[float] = []
        self._partial = False
        self._start: float | None = None
        self._handles = [module.register_forward_pre_hook(self._begin), module.register_forward_hook(self._end)]

    def mark_partial(self, blocks: str | None = None) -> None:
        """The call in progress ran part of the network (DeepCache's shallow branch, the
        blocks outside a cached span); ``blocks``: which blocks computed ('1') or not ('0')."""
        self._partial = True
        mark_call(PARTIAL, blocks)

    def mark_reused(self, blocks: str | None = None) -> None:
        """The call in progress was answered from a cache (what ran is the cheap check
        deciding so): partial in time, reused in the timeline."""
        self._partial = True
        mark_call(REUSED, blocks)

    def _begin(self, *_args) -> None:
        synchronize(self.device)
        self._partial = False
        self._start = time.perf_counter()

    def _end(self, *_args) -> None:
        synchronize(self.device)
        if self._start is None:
            return
        elapsed = time.perf_counter() - self._start
        (self.partial if self._partial else self.full).append(elapsed)
        self._start, self._partial = None, False

    def reset(self) -> None:
        self.full, self.partial = [], []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def stats(self) -> dict[str, Any]:
        """Counts, total seconds and median milliseconds of full and partial calls, and the
        denoising loop's ideal speedup from them."""
        full_ms = 1000 * statistics.median(self.full) if self.full else None
        partial_ms = 1000 * statistics.median(self.partial) if self.partial else None
        ideal = ideal_speedup(len(self.full), len(self.partial), full_ms or 0.0, partial_ms or 0.0)
        return {
            "evals_full": len(self.full),
            "evals_partial": len(self.partial),
            "full_eval_s": round(sum(self.full), 6),
            "partial_eval_s": round(sum(self.partial), 6),
            "full_eval_ms": None if full_ms is None else round(full_ms, 3),
            "partial_eval_ms": None if partial_ms is None else round(partial_ms, 3),
            "ideal_speedup": None if ideal is None else round(ideal, 4),
        }


