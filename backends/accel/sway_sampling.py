"""Sway sampling (Chen et al. 2024, F5-TTS): spend a flow-matching model's steps early.

The ODE of a flow-matching model is integrated on flow times t in [0, 1] (0 = noise,
1 = data). Sway sampling keeps the step count and bends the uniform grid with

    t' = t + s * (cos(pi/2 * t) - 1 + t)

which fixes both ends; with s < 0 the steps crowd near the noise end, where the
trajectory's coarse structure (for speech: alignment, for music: pitch and rhythm) is
decided, so fewer steps keep more quality (the paper's default s = -1 gives
t' = 1 - cos(pi/2 * t)). It is a schedule, not a cache: the cost per step is unchanged,
the gain is reaching a given quality with fewer steps (combine it with ``sampler(steps=N)``).

In diffusers terms sigma = 1 - t', so the method hands the scheduler the custom sigmas
``1 - t'(i / N)`` for i = 0 .. N-1 (the scheduler appends the final 0). The scheduler's own
``shift`` / dynamic shifting still applies on top, as it does to any custom sigmas.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from backends.accel._patch import patch_attr
from backends.accel.base import Limits, Method, MethodConfig, MethodSpec, param, register
from backends.accel.sampler import is_flow_matching
from backends.plan import DiffusionPlan, RunHandle
from backends.types import ValidationError


class SwaySamplingConfig(MethodConfig):
    """Values in [-1, 1] keep the grid monotonic; 0 is the plain uniform grid; positive
    crowds the steps near the data end."""

    coefficient: float = param(-1.0, min=-1.0, max=1.0, step=0.1,
                               help="s in t' = t + s(cos(pi/2 t) - 1 + t); negative = more steps near noise "
                                    "(paper: -1)")


def sway(t: float, coefficient: float) -> float:
    """The sway map of F5-TTS: t + s * (cos(pi/2 t) - 1 + t)."""
    return t + coefficient * (math.cos(math.pi / 2 * t) - 1 + t)


def sway_sigmas(num_steps: int, coefficient: float) -> list[float]:
    """The ``num_steps`` sigmas (noise level, 1 -> near 0) of a swayed uniform flow-time grid."""
    if num_steps < 1:
        raise ValidationError("sway sampling needs at least one step")
    return [1.0 - sway(i / num_steps, coefficient) for i in range(num_steps)]


def supports_custom_sigmas(scheduler: Any) -> bool:
    return "sigmas" in inspect.signature(scheduler.set_timesteps).parameters


def check_scheduler(scheduler: Any) -> None:
    name = type(scheduler).__name__
    if not is_flow_matching(scheduler):
        raise ValidationError(
            f"sway sampling needs a flow-matching model (rectified-flow scheduler); this model samples with "
            f"{name}, a noise-prediction schedule"
        )
    if not supports_custom_sigmas(scheduler):
        raise ValidationError(f"sway sampling needs a scheduler that takes custom sigmas; {name} does not")


class _SwaySetTimesteps:
    """Stands in for ``scheduler.set_timesteps``: swaps whatever grid the pipeline asks for
    (a step count, or its own default sigmas) for the swayed one of the same length."""

    def __init__(self, original, coefficient: float):
        self.original, self.coefficient = original, coefficient
        self.last_sigmas: list[float] = []

    def __call__(self, num_inference_steps=None, device=None, sigmas=None, timesteps=None, **kwargs):
        steps = num_inference_steps
        if steps is None:
            steps = len(sigmas) if sigmas is not None else len(timesteps)
        self.last_sigmas = sway_sigmas(int(steps), self.coefficient)
        return self.original(device=device, sigmas=self.last_sigmas, **kwargs)


@register
class SwaySamplingMethod(Method):
    spec = MethodSpec(
        name="sway_sampling",
        title="Sway sampling",
        modalities=("audio",),
        families=("audio-dit", "audio-unet"),
        summary="Bend the flow-matching time grid towards the noise end (F5-TTS); same steps, better spent.",
        paper="Chen et al. 2024, F5-TTS: A Fairytaler that Fakes Fluent and Faithful Speech with Flow Matching",
        lossless=False,
        config=SwaySamplingConfig,
    )

    @classmethod
    def limits(cls, backend) -> Limits:
        """No use at all on a noise-prediction model (the bundled audio UNet samples with DDIM)."""
        try:
            check_scheduler(backend.base_scheduler)
        except ValidationError as exc:
            return Limits(unfit=str(exc))
        return Limits()

    def attach(self, backend, plan: DiffusionPlan) -> RunHandle:
        # the sampler attaches first, so this patches the scheduler the run will use
        scheduler = backend.pipe.scheduler
        check_scheduler(scheduler)
        patch = _SwaySetTimesteps(scheduler.set_timesteps, self.config.coefficient)
        handle = RunHandle(plan, lambda: {"first_sigmas": [round(s, 4) for s in patch.last_sigmas[:4]]}
                           if patch.last_sigmas else {}, self.notes)
        patch_attr(handle, scheduler, "set_timesteps", patch)  # puts back an earlier patch, or none
        plan.kwargs.pop("sigmas", None)
        plan.kwargs.pop("timesteps", None)
        return handle

    def notes(self, plan: DiffusionPlan) -> list[str]:
        if self.config.coefficient == 0:
            return ["sway sampling with coefficient 0 is the plain uniform grid: it changes nothing"]
        return []
