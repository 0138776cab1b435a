"""The one measurement engine: Compare, sweeps and ``python -m benchmarks`` all time runs here.

A speedup measured as ``median(baseline runs) / median(config runs)`` from a block of
baseline runs followed by a block of configuration runs is at the mercy of the machine:
a first, cold run (lazy initialisation, allocator growth) or a burst of load from another
process lands on one side only. (The Compare tab once showed DeepCache at 1.02x where
paired runs gave 2.08x.) So:

- **warm-up**: each configuration runs once untimed, right before its first timed run;
- **interleaved per case**: for each repetition, for each case (a prompt or a seed), the
  baseline and every configuration run back to back (baseline, c1, c2, baseline, c1,
  c2, ...), so a change in load hits every member of a pair within seconds;
- **paired ratios**: each configuration run is divided into the baseline run of the same
  case and repetition; the speedup is the median of those ratios, shown with their
  spread (min-max);
- **ideal and efficiency**: a caching method reports, per run, the speedup its skipped
  work would give at the measured costs of a full and a partial evaluation
  (``backends.accel._eval_cost``); efficiency = measured speedup / ideal.

The engine knows nothing about models: the caller passes ``run(config, case) -> Timed``
(and ``warm``), so a test can drive it with a fake runner and known times.
"""

from __future__ import annotations

import statistics
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from backends.control import RunCancelled, RunTimedOut
from backends.types import StudioError, ValidationError


class Cancelled(StudioError):
    """The whole measurement was cancelled (the cancel flag was set between runs)."""


@dataclass
class Timed:
    """One timed run as the runner reports it: wall seconds, what the caller keeps (the
    last repetition's per case), the run's ideal speedup, and the device it ran on (a
    pair is only formed within one device)."""

    seconds: float
    result: Any = None
    ideal: float | None = None
    device: str = ""


@dataclass
class Trial:
    config: int
    case: int
    repeat: int
    seconds: float
    ideal: float | None = None
    device: str = ""


@dataclass
class ConfigRuns:
    """Everything measured for one configuration."""

    index: int
    trials: list[Trial] = field(default_factory=list)
    last: dict[int, Any] = field(default_factory=dict)  # case -> result of its last repetition
    error: str | None = None
    # True when the error is the request's own (a ValidationError: the configuration does
    # not fit this model), not something that went wrong while running it
    unfit: bool = False
    started: bool = False
    warmed: bool = False


@dataclass
class Spread:
    """Median of paired ratios and their range."""

    median: float
    low: float
    high: float
    pairs: int


@dataclass
class Measurement:
    runs: list[ConfigRuns]
    order: list[tuple[int, int, int]]  # (config, case, repeat) in the order the timed runs were made
    cancelled: bool = False


def run_order(configs: int, cases: int, repeats: int) -> list[tuple[int, int, int]]:
    """(config, case, repeat) triples: per repetition, per case, every configuration
    (config 0 is the baseline)."""
    return [(c, case, rep) for rep in range(repeats) for case in range(cases) for c in range(configs)]


def paired_ratios(base: ConfigRuns, other: ConfigRuns) -> list[float]:
    """``baseline seconds / config seconds`` for every (case, repetition) both measured on
    the same device."""
    by_key = {(t.case, t.repeat): t for t in base.trials}
    ratios = []
    for trial in other.trials:
        paired = by_key.get((trial.case, trial.repeat))
        if paired is not None and trial.seconds > 0 and paired.device == trial.device:
            ratios.append(paired.seconds / trial.seconds)
    return ratios


def spread(values: list[float]) -> Spread | None:
    if not values:
        return None
    return Spread(statistics.median(values), min(values), max(values), len(values))


def median_ideal(runs: ConfigRuns) -> float | None:
    ideals = [t.ideal for t in runs.trials if t.ideal is not None]
    return statistics.median(ideals) if ideals else None


def efficiency(speedup: float | None, ideal: float | None) -> float | None:
    """Measured / ideal: how much of what the method skipped became wall time."""
    if speedup is None or not ideal:
        return None
    return speedup / ideal


def round_seconds(runs: ConfigRuns) -> list[float]:
    """Per repetition, the seconds of all its cases together (the benchmark tables' figure)."""
    totals: dict[int, float] = {}
    for trial in runs.trials:
        totals[trial.repeat] = totals.get(trial.repeat, 0.0) + trial.seconds
    return [totals[k] for k in sorted(totals)]


def measure(
    configs: int,
    cases: int,
    run: Callable[[int, int], Timed],
    *,
    repeats: int = 3,
    warm: Callable[[int, int], Any] | None = None,
    cancel: Any = None,
    progress: Callable[[int, int, str], None] | None = None,
    labels: list[str] | None = None,
    parallel: int = 1,
) -> Measurement:
    """Time ``configs`` configurations (0 = the baseline) on ``cases`` cases, ``repeats``
    times, interleaved. ``warm(config, case)`` runs untimed before a configuration's first
    timed run. A configuration whose run fails (``StudioError``, a time-out) keeps its error
    and is left out of later rounds; a cancel (the flag, or ``RunCancelled`` from a run)
    stops everything and marks the configurations started so far ``cancelled``.
    ``parallel`` > 1 runs the configurations of one round side by side (executor workers)."""
    labels = labels or [str(i) for i in range(configs)]
    runs = [ConfigRuns(i) for i in range(configs)]
    order: list[tuple[int, int, int]] = []
    total = configs * cases * repeats + (configs if warm else 0)
    done = [0]
    lock = threading.Lock()

    def tick(label: str) -> None:
        with lock:
            done[0] += 1
            count = done[0]
        if progress:
            progress(count, total, label)

    def one(config: int, case: int, repeat: int) -> None:
        state = runs[config]
        if cancel is not None and cancel.is_set():
            raise Cancelled("comparison cancelled")
        state.started = True
        try:
            if warm is not None and not state.warmed:
                warm(config, case)
                state.warmed = True
                tick(f"{labels[config]} warm-up")
                if cancel is not None and cancel.is_set():
                    raise Cancelled("comparison cancelled")
            timed = run(config, case)
        except RunTimedOut as exc:  # this configuration ran too long; the others go on
            state.error = str(exc)
            return
        except (RunCancelled, Cancelled):  # the whole measurement stops (handled below)
            raise
        except StudioError as exc:
            state.error = str(exc)
            state.unfit = isinstance(exc, ValidationError)
            return
        with lock:
            state.trials.append(Trial(config, case, repeat, timed.seconds, timed.ideal, timed.device))
            state.last[case] = timed.result
            order.append((config, case, repeat))
        tick(f"{labels[config]} (case {case + 1}, repeat {repeat + 1})")

    cancelled = False
    pool = ThreadPoolExecutor(max_workers=parallel) if parallel > 1 else None
    try:
        for repeat in range(repeats):
            for case in range(cases):
                live = [c for c in range(configs) if runs[c].error is None]
                if configs > 1 and live in ([], [0]):
                    break  # every configuration failed: timing the baseline alone compares nothing
                if pool is None:
                    for config in live:
                        one(config, case, repeat)
                else:
                    list(pool.map(lambda c: one(c, case, repeat), live))
    except (Cancelled, RunCancelled):
        cancelled = True
        for state in runs:
            if state.started and state.error is None:
                state.error = "cancelled"
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    if progress and not cancelled:
        progress(total, total, "done")
    return Measurement(runs, order, cancelled)


@dataclass
class Summary:
    """One configuration's figures, as Compare's rows and the benchmark JSON carry them."""

    seconds: float | None
    round_seconds: float | None
    speedup: Spread | None
    ideal: float | None
    efficiency: float | None


def summarize(measurement: Measurement) -> list[Summary]:
    base = measurement.runs[0]
    out = []
    for runs in measurement.runs:
        seconds = [t.seconds for t in runs.trials]
        rounds = round_seconds(runs)
        speed = spread(paired_ratios(base, runs)) if base.trials else None
        ideal = median_ideal(runs)
        out.append(Summary(
            seconds=statistics.median(seconds) if seconds else None,
            round_seconds=statistics.median(rounds) if rounds else None,
            speedup=speed,
            ideal=ideal,
            efficiency=efficiency(speed.median if speed else None, ideal),
        ))
    return out
