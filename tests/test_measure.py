"""The measurement engine (studio.measure) and the ideal speedup (backends.accel._eval_cost),
driven by fake runners with known times: no timing is measured, none is asserted."""

from __future__ import annotations

import threading

import pytest
import torch

from backends.accel._eval_cost import EvalCostMeter, end_to_end_ideal, ideal_speedup, run_ideal
from backends.types import ValidationError
from studio.measure import Timed, measure, paired_ratios, run_order, summarize


class FakeRunner:
    """Returns ``seconds[(config, case, repeat)]`` and records every call in order."""

    def __init__(self, seconds, ideals=None, fail=()):
        self.seconds, self.ideals, self.fail = seconds, ideals or {}, set(fail)
        self.calls: list[tuple] = []
        self.repeat: dict[tuple[int, int], int] = {}

    def run(self, config, case):
        repeat = self.repeat.get((config, case), 0)
        self.repeat[(config, case)] = repeat + 1
        self.calls.append(("run", config, case))
        if config in self.fail:
            raise ValidationError(f"config {config} does not fit this model")
        return Timed(self.seconds[(config, case, repeat)], f"out-{config}-{case}-{repeat}",
                     self.ideals.get(config))

    def warm(self, config, case):
        self.calls.append(("warm", config, case))


def constant(configs, cases, repeats, value=1.0):
    return {(c, k, r): value for c in range(configs) for k in range(cases) for r in range(repeats)}


def test_runs_are_interleaved_per_case_and_warmed_just_before_their_first_run():
    runner = FakeRunner(constant(3, 2, 2))
    measured = measure(3, 2, runner.run, repeats=2, warm=runner.warm)
    assert measured.order == run_order(3, 2, 2)
    assert measured.order[:6] == [(0, 0, 0), (1, 0, 0), (2, 0, 0), (0, 1, 0), (1, 1, 0), (2, 1, 0)]
    assert runner.calls[:6] == [("warm", 0, 0), ("run", 0, 0), ("warm", 1, 0), ("run", 1, 0),
                                ("warm", 2, 0), ("run", 2, 0)]
    assert sum(call[0] == "warm" for call in runner.calls) == 3  # once per configuration


def test_speedup_is_the_median_of_paired_ratios_with_their_range():
    """The machine slows down 5x in the second repetition: every pair stays 2x, while a
    ratio of medians over blocks run one after another would not."""
    seconds = {}
    for rep, load in enumerate((1.0, 5.0, 1.0)):
        for case in range(2):
            seconds[(0, case, rep)] = 2.0 * load
            seconds[(1, case, rep)] = 1.0 * load
            seconds[(2, case, rep)] = (4.0 if (case, rep) == (1, 2) else 2.0) * load  # one pair at 0.5x
    runner = FakeRunner(seconds, ideals={1: 2.5})
    measured = measure(3, 2, runner.run, repeats=3)
    base, fast, slow = summarize(measured)
    assert base.speedup.median == 1.0
    assert fast.speedup.median == pytest.approx(2.0) and fast.speedup.low == fast.speedup.high == pytest.approx(2.0)
    assert fast.speedup.pairs == 6
    assert slow.speedup.median == pytest.approx(1.0)
    assert slow.speedup.low == pytest.approx(0.5) and slow.speedup.high == pytest.approx(1.0)
    assert fast.ideal == 2.5 and fast.efficiency == pytest.approx(0.8)
    assert base.ideal is None and base.efficiency is None
    assert fast.round_seconds == pytest.approx(2.0)  # per repetition, both cases: 2, 10, 2 -> median 2
    assert measured.runs[1].last == {0: "out-1-0-2", 1: "out-1-1-2"}  # the last repetition per case


def test_pairs_match_case_and_repetition_and_device():
    seconds = {(0, 0, 0): 3.0, (0, 0, 1): 6.0, (1, 0, 0): 1.0, (1, 0, 1): 3.0}
    measured = measure(2, 1, FakeRunner(seconds).run, repeats=2)
    assert sorted(paired_ratios(measured.runs[0], measured.runs[1])) == [2.0, 3.0]
    measured.runs[1].trials[0].device = "cuda:0"  # measured elsewhere: not a pair
    assert paired_ratios(measured.runs[0], measured.runs[1]) == [2.0]


def test_a_failing_configuration_is_dropped_and_the_others_go_on():
    runner = FakeRunner(constant(3, 1, 3), fail={1})
    measured = measure(3, 1, runner.run, repeats=3)
    assert "does not fit" in measured.runs[1].error and not measured.runs[1].trials
    assert [t.repeat for t in measured.runs[2].trials] == [0, 1, 2]
    assert sum(call[1] == 1 for call in runner.calls) == 1  # not retried in later rounds


def test_when_every_configuration_failed_the_baseline_is_not_timed_alone():
    """A configuration the model refuses fails at its first run: the auto-tuner then
    spent 4 cases x 2 repeats of baseline runs on nothing to compare."""
    runner = FakeRunner(constant(2, 4, 2), fail={1})
    measured = measure(2, 4, runner.run, repeats=2)
    assert measured.runs[1].unfit and len(measured.runs[0].trials) == 1
    baseline_only = measure(1, 2, FakeRunner(constant(1, 2, 2)).run, repeats=2)
    assert len(baseline_only.runs[0].trials) == 4  # a baseline-only measurement still runs


def test_a_cancel_between_runs_stops_the_measurement():
    cancel = threading.Event()
    runner = FakeRunner(constant(3, 1, 3))

    def run(config, case):
        if len(runner.calls) == 4:
            cancel.set()
        return runner.run(config, case)

    measured = measure(3, 1, run, repeats=3, cancel=cancel)
    assert measured.cancelled and len(runner.calls) == 5
    assert [r.error for r in measured.runs] == ["cancelled"] * 3


def test_ideal_speedup_from_full_and_partial_costs():
    # DeepCache at interval 3 over 25 steps: 9 full (30 ms), 16 shallow (6 ms)
    assert ideal_speedup(9, 16, 30.0, 6.0) == pytest.approx(25 * 30 / (9 * 30 + 16 * 6))
    assert ideal_speedup(25, 0, 30.0, 0.0) == 1.0  # a policy that never skips
    assert ideal_speedup(0, 0, 0.0, 0.0) is None  # no calls: nothing to say
    assert ideal_speedup(0, 5, 0.0, 1.0) is None  # no full call to weigh against


def test_end_to_end_ideal_keeps_the_time_outside_the_denoiser():
    # 10 full calls of 0.1 s, 10 partial of 0.02 s, 0.3 s of encoding/decoding: run 1.5 s
    stats = {"evals_full": 10, "evals_partial": 10, "full_eval_s": 1.0, "partial_eval_s": 0.2, "full_eval_ms": 100.0}
    assert end_to_end_ideal(stats, 1.5) == pytest.approx((0.3 + 20 * 0.1) / 1.5)
    assert end_to_end_ideal({"cache_hit_rate": 0.5}, 1.5) is None  # no cost figures: no ideal
    never = {"evals_full": 10, "evals_partial": 0, "full_eval_s": 1.0, "partial_eval_s": 0.0, "full_eval_ms": 100.0}
    assert end_to_end_ideal(never, 1.3) == pytest.approx(1.0)
    assert run_ideal({"deepcache": stats}, 1.5) == pytest.approx(2.3 / 1.5)
    # a method without cost figures changes the work unseen (fewer steps...): no ideal
    assert run_ideal({"sampler": {}, "deepcache": stats}, 1.5) is None
    assert run_ideal({"sampler": {}}, 1.5) is None and run_ideal({}, 1.5) is None


def test_the_meter_files_calls_as_partial_when_the_method_says_so():
    layer = torch.nn.Linear(4, 4)
    meter = EvalCostMeter(layer)
    marker = layer.register_forward_pre_hook(lambda module, args: meter.mark_partial() if args[0].sum() < 0 else None)
    x = torch.ones(1, 4)
    for sign in (1, -1, -1, 1, -1):
        layer(sign * x)
    marker.remove()
    meter.remove()
    layer(x)  # removed: not timed
    stats = meter.stats()
    assert stats["evals_full"] == 2 and stats["evals_partial"] == 3
    assert stats["ideal_speedup"] is not None and stats["full_eval_s"] > 0
