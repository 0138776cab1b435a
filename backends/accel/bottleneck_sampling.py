"""Bottleneck Sampling (Tian et al. 2025, seed 144: "high-low-high resolution denoising with
timestep shift", 3x image, 2.5x video).

Most diffusion models were pre-trained at a lower resolution before the high-resolution
stage, so their low-resolution prior is good. Bottleneck Sampling keeps the first steps at
full resolution (the layout is decided there), runs the middle steps on a latent ``factor``
times smaller per side (``factor^2`` fewer tokens per call), and returns to full resolution
for the last steps (detail). At each change of resolution the clean estimate of the latent
(x0 = x - sigma v) is resized (area average down, bilinear up) and noise is reintroduced at
the next stage's first sigma; entering the final stage that sigma is raised
(``renoise``: its noise-to-signal ratio is that many times the previous stage's last), so
the model can repair the upsampling's blur. Each stage walks its own sigma range with its
own time shift (the paper's per-stage "scheduler re-shifting"): a lower resolution needs
less noise to hide the same structure, a higher one more.

The step count is the run's (``sampler(steps=N)`` sets it); the boundaries are fractions
of it. The machinery (patched scheduler, strided low-resolution calls, positions of the
smaller grid) is shared with RALU in ``backends/accel/_multires.py``.
"""

from __future__ import annotations

import torch

from backends.accel._multires import (MultiResRun, Stage, check_steps, down_area, down_nearest, flow_x0,
                                      layout_for, lift_noise, solver_note, stage_sigmas, up_nearest, up_smooth)
from backends.accel.base import Limits, Method, MethodConfig, MethodSpec, param, register
from backends.plan import DiffusionPlan, RunHandle, require_from_noise
from backends.types import ValidationError


class BottleneckSamplingConfig(MethodConfig):
    low_start: float = param(0.2, min=0.0, max=0.9, step=0.05,
                             help="fraction of the steps run at full resolution before the low-resolution stage")
    low_end: float = param(0.8, min=0.1, max=0.95, step=0.05,
                           help="fraction of the steps after which the run returns to full resolution")
    factor: int = param(2, choices=(2, 4), help="how many times smaller each side is in the middle stage")
    renoise: float = param(2.0, min=1.0, max=10.0, step=0.5,
                           help="entering the last stage, the noise-to-signal ratio is this many times the "
                                "middle stage's last (1 = no extra noise)")
    low_shift: float = param(0.5, min=0.1, max=10.0, step=0.1,
                             help="time shift of the low-resolution stage's steps (< 1 spends them at lower noise)")
    positions: str = param("grid", choices=("grid", "scaled"),
                           help="token positions of the smaller grid: its own (grid, the paper's) or the full "
                                "grid's coordinates (scaled: position interpolation, for models trained at one size)")
    final_shift: float = param(2.0, min=0.1, max=10.0, step=0.1,
                               help="time shift of the final full-resolution stage's steps (> 1 spends more of "
                                    "them at high noise, where the upsampled latent is repaired)")


def bottleneck_stages(config: BottleneckSamplingConfig, base: list[float]) -> list[Stage]:
    """Three stages over the model's own schedule ``base`` (``steps + 1`` sigmas): full
    resolution on ``base`` up to the first boundary, then the low and the final stages on
    their own shifted grids between the model's sigmas at the boundaries."""
    steps = len(base) - 1
    first = round(config.low_start * steps)
    second = min(steps - 1, max(first + 1, round(config.low_end * steps)))  # the last step is at full size
    stages = [Stage(1, base[:first + 1])] if first > 0 else []
    stages.append(Stage(config.factor, stage_sigmas(base[first], base[second], second - first, config.low_shift)))
    start = lift_noise(base[second], config.renoise)
    stages.append(Stage(1, stage_sigmas(start, base[-1], steps - second, config.final_shift)))
    check_steps(stages, "bottleneck_sampling")
    return stages


def bottleneck_transition(run: MultiResRun, x: torch.Tensor, v: torch.Tensor, k: int) -> torch.Tensor:
    """Resize the clean estimate to the next stage's size and reintroduce noise at its first sigma."""
    done, nxt = run.stages[k], run.stages[k + 1]
    layout = run.layout
    x0 = down_nearest(layout.to_grid(flow_x0(x, v, done.sigmas[-1])), done.factor)
    if nxt.factor > done.factor:
        x0 = down_area(x0, nxt.factor // done.factor)
    elif nxt.factor < done.factor:
        x0 = up_smooth(x0, done.factor // nxt.factor)
    sigma = nxt.sigmas[0]
    fresh = (1 - sigma) * x0 + sigma * run.noise(tuple(x0.shape), x0.device)
    return layout.from_grid(up_nearest(fresh, nxt.factor).contiguous())


@register
class BottleneckSamplingMethod(Method):
    spec = MethodSpec(
        name="bottleneck_sampling",
        title="Bottleneck Sampling (high-low-high resolution)",
        modalities=("image", "video"),
        families=("dit", "video-dit"),
        summary="Run the middle denoising steps on a smaller latent (fewer tokens per call), with full "
                "resolution first and last; re-noise and re-shift the schedule at each change of resolution.",
        paper="Tian et al. 2025, Training-free Diffusion Acceleration with Bottleneck Sampling (seed 144: 3x image, "
              "2.5x video)",
        lossless=False,
        defaults_note="our reading of the paper's three-stage schedule (its exact per-stage steps and shifts "
                      "were not available to us)",
        config=BottleneckSamplingConfig,
        slots=("resolution", "dit-cache"),  # block caches keep token-count-shaped state across steps
    )

    @classmethod
    def limits(cls, backend) -> Limits:
        """The low-resolution stage has a width: low_end > low_start (any model). The search
        keeps every stage at least 0.3 of the steps wide, so that a short tune run still
        gives each stage a step (a narrower stage is refused at attach for that step count)."""
        return Limits(ranges={"low_end": (("low_start", 0.05), None)},
                      search_ranges={"low_start": (None, 0.5), "low_end": (("low_start", 0.3), 0.8)})

    def attach(self, backend, plan: DiffusionPlan) -> RunHandle:
        config = self.config
        require_from_noise(plan, "bottleneck_sampling", "its stages are fractions of the whole schedule")
        if config.low_end <= config.low_start:
            raise ValidationError("bottleneck_sampling: low_end must be after low_start")
        layout = layout_for(backend, plan, config.factor, "bottleneck_sampling", config.positions)
        bottleneck_stages(config, [1.0 - i / max(plan.steps, 1) for i in range(plan.steps + 1)])  # refuse early
        run = MultiResRun(backend, layout, lambda base: bottleneck_stages(config, base), bottleneck_transition,
                          plan.kwargs.get("generator"))
        notes = solver_note(backend, "bottleneck_sampling")
        handle = RunHandle(plan, run.stats, lambda p: notes + self.notes(p))
        with handle.undo_on_error():
            run.attach(handle)
        return handle

    def notes(self, plan: DiffusionPlan) -> list[str]:
        out: list[str] = []
        if plan.steps < 6:
            out.append(f"bottleneck_sampling: {plan.steps} steps leave at most a step or two per stage")
        return out
