"""AdaCache (Kahatapitiya et al. 2024, "Adaptive Caching for Faster Video Generation with
Diffusion Transformers"): a caching schedule chosen per video, as it is generated.

Not every video needs the same number of denoising computations: a still scene changes
little from step to step, a busy one a lot. After each computed step, AdaCache measures
how much the block stack's residual (``output - input``) changed since the previous
computed step, per step elapsed, and looks the rate up in a *codebook* of thresholds:
the smaller the change, the more following steps reuse the residual instead of running
the blocks. *Motion regularisation* (MoReg) scales that rate by the video's motion, here
the frame-to-frame change of the residual, so that a clip with more motion is recomputed
more often. On image DiTs (one frame) it is the same adaptive schedule without MoReg.

The residual reuse itself is the span cache shared with TeaCache and Δ-DiT
(``_block_span``); this module only decides when to recompute.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from backends.accel._block_span import SpanCache, block_lists, span_handle
from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.plan import DiffusionPlan, RunHandle
from backends.types import ValidationError

# (relative change per step, steps to reuse the cache after a computed step), ascending:
# the first threshold the measured rate stays under gives the reuse count. The paper's
# Open-Sora codebook spans 0.03-0.11 over 100 steps; at 25-50 steps the per-step change
# is larger, hence the wider default, which ``scale`` stretches or shrinks.
DEFAULT_CODEBOOK = ((0.08, 5), (0.12, 4), (0.18, 3), (0.26, 2), (0.40, 1))


class AdaCacheConfig(MethodConfig):
    """The last step is always computed too; ``num_steps`` (the run's) is set at run time."""

    scale: float = param(1.0, min=0.1, max=5.0, step=0.1,
                         help="multiplies the codebook thresholds: higher reuses more (faster, rougher)")
    max_reuse: int = param(4, min=1, max=10, help="most consecutive steps answered from the cache")
    moreg: bool = param(True, help="motion regularisation: more motion, fewer reused steps")
    moreg_strength: float = param(1.0, min=0.0, max=10.0, step=0.5,
                                  help="how much the motion score shortens reuse (rate x (1 + strength x motion))")
    warmup_steps: int = param(2, min=0, max=50, help="first steps always computed")
    num_steps: int = 0
    codebook: tuple[tuple[float, int], ...] = DEFAULT_CODEBOOK


def reuse_steps(rate: float, config: AdaCacheConfig) -> int:
    """How many steps to reuse after a computed step whose residual changed at ``rate``."""
    for threshold, steps in config.codebook:
        if rate <= threshold * config.scale:
            return min(steps, config.max_reuse)
    return 0


def residual_change(current: torch.Tensor, previous: torch.Tensor) -> float:
    return ((current - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12)).item()


def motion_score(residual: torch.Tensor, frames: int) -> float | None:
    """Mean frame-to-frame change of the residual relative to its size; None for one frame."""
    if frames <= 1 or residual.dim() != 3 or residual.shape[1] % frames:
        return None
    per_frame = residual.reshape(residual.shape[0], frames, -1, residual.shape[-1])
    change = (per_frame[:, 1:] - per_frame[:, :-1]).abs().mean()
    return (change / per_frame.abs().mean().clamp_min(1e-12)).item()


def token_frames(denoiser: torch.nn.Module, hidden_states: torch.Tensor) -> int:
    """Latent frames after temporal patching, for video DiTs taking (B, C, T, H, W) latents
    (Wan, HunyuanVideo, LTX after unpacking...); 1 for image DiTs or unknown layouts."""
    if hidden_states.dim() != 5:
        return 1
    patch = getattr(denoiser.config, "patch_size", None)
    temporal = patch[0] if isinstance(patch, (tuple, list)) and len(patch) == 3 else \
        getattr(denoiser.config, "patch_size_t", None) or 1
    return max(1, hidden_states.shape[2] // int(temporal))


class AdaptiveSchedule:
    """The deciding function for ``SpanCache``: one per run, state kept per CFG branch."""

    def __init__(self, config: AdaCacheConfig, pipe: Any = None):
        self.config, self.pipe = config, pipe
        self.frames = 1
        self.rates: list[float] = []
        self.motions: list[float] = []
        self.reuse_plan: list[int] = []

    def __call__(self, _module, _args, _kwargs, state) -> bool:
        step = state.calls
        extra = state.extra
        if not state.reuse and state.residuals is not None:  # the previous call computed: a new residual
            self._after_computed_step(step - 1, state.residuals[0], extra)
        steps = getattr(self.pipe, "_num_timesteps", None) or self.config.num_steps
        if step < self.config.warmup_steps or (steps > 0 and step >= steps - 1):
            return False
        return step < extra.get("reuse_until", 0)

    def _after_computed_step(self, step: int, residual: torch.Tensor, extra: dict) -> None:
        previous = extra.get("residual")
        extra["residual"] = (residual, step)
        if previous is None:
            return
        prev_residual, prev_step = previous
        with torch.no_grad():
            rate = residual_change(residual, prev_residual) / max(1, step - prev_step)
            motion = motion_score(residual, self.frames) if self.config.moreg else None
        self.rates.append(rate)
        if motion is not None:
            self.motions.append(motion)
            rate *= 1.0 + self.config.moreg_strength * motion
        reuse = reuse_steps(rate, self.config)
        self.reuse_plan.append(reuse)
        extra["reuse_until"] = step + 1 + reuse


def apply_adacache(denoiser, config: AdaCacheConfig, pipe=None) -> tuple[SpanCache, AdaptiveSchedule, Any]:
    """Hook the whole block stack; returns (cache, schedule, grid hook). ``remove()`` both handles."""
    blocks = [block for _, block in block_lists(denoiser)]
    schedule = AdaptiveSchedule(config, pipe)

    def read_grid(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if isinstance(hidden, torch.Tensor):
            schedule.frames = token_frames(module, hidden)

    grid_hook = denoiser.register_forward_pre_hook(read_grid, with_kwargs=True)
    cache = SpanCache(denoiser, blocks, schedule, "adacache")
    return cache, schedule, grid_hook


@register
class AdaCacheMethod(Method):
    spec = MethodSpec(
        name="adacache",
        title="AdaCache (adaptive, motion-regularised)",
        modalities=("image", "video"),
        families=("dit", "video-dit"),
        summary="After each computed step, the change of the blocks' residual (scaled up by the clip's "
                "motion) picks from a codebook how many following steps reuse it: still scenes skip more.",
        paper="Kahatapitiya et al. 2024, Adaptive Caching for Faster Video Generation with Diffusion "
              "Transformers (arXiv 2411.02397)",
        lossless=False,
        config=AdaCacheConfig,
        slots=("dit-cache",),
    )

    def attach(self, backend, plan: DiffusionPlan) -> RunHandle:
        denoiser = backend.denoiser
        if not block_lists(denoiser):
            raise ValidationError(f"adacache found no transformer block list in {type(denoiser).__name__}")
        # the always-computed last step needs the plan's step count
        cache, schedule, grid_hook = apply_adacache(denoiser, replace(self.config, num_steps=plan.steps),
                                                    pipe=getattr(backend, "pipe", None))
        handle = span_handle(plan, cache, lambda: self.schedule_stats(schedule), self.notes)
        handle.on_remove(grid_hook.remove)
        return handle

    @staticmethod
    def schedule_stats(schedule) -> dict[str, Any]:
        return {
            "reuse_plan": schedule.reuse_plan,
            "mean_change_rate": round(sum(schedule.rates) / len(schedule.rates), 4) if schedule.rates else None,
            "mean_motion": round(sum(schedule.motions) / len(schedule.motions), 4) if schedule.motions else None,
            "frames": schedule.frames,
        }

    def notes(self, plan: DiffusionPlan) -> list[str]:
        steps = plan.steps
        if steps <= self.config.warmup_steps + 2:
            return [f"adacache at {steps} steps: the warm-up, the first measurement and the last step are "
                    "always computed, so little or nothing can be reused"]
        return []
