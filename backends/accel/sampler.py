"""Sampler swap and step count: the oldest speed-up, fewer and better-spent steps.

DDIM (Song et al. 2021), DPM-Solver++ 2M (Lu et al. 2022), UniPC (Zhao et al. 2023),
Euler (Karras et al. 2022), LCM (Luo et al. 2023, needs an LCM-distilled model).
Flow-matching models (FLUX, SD3, Wan) keep their flow scheduler family.
"""

from __future__ import annotations

from typing import Any

from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.plan import DiffusionPlan, RunHandle
from backends.types import ValidationError

SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
FLOW_SCHEDULERS = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                                                 "algorithm_type": "dpmsolver++", "solver_order": 2}),
}


def is_flow_matching(scheduler: Any) -> bool:
    return "FlowMatch" in type(scheduler).__name__ or bool(getattr(scheduler.config, "use_flow_sigmas", False))


class SamplerConfig(MethodConfig):
    scheduler: str = param("keep", choices=("keep", "ddim", "dpmpp_2m", "unipc", "euler", "lcm"),
                           help="'keep' leaves the model's own scheduler and only changes the step count")
    steps: int = param(20, min=1, max=150, help="denoising steps (model evaluations per guidance pass)")


@register
class SamplerMethod(Method):
    spec = MethodSpec(
        name="sampler",
        title="Sampler / steps",
        modalities=("image", "video", "audio"),
        families=("unet", "dit", "video-dit", "audio-unet", "audio-dit"),
        summary="Swap the scheduler and set the step count; fewer steps is the most direct speed-up.",
        paper="DPM-Solver++ (Lu et al. 2022); UniPC (Zhao et al. 2023)",
        lossless=False,
        config=SamplerConfig,
    )
    attach_first = True  # the other methods read the scheduler and the step count it sets

    def attach(self, backend, plan: DiffusionPlan) -> RunHandle:
        handle = RunHandle(plan)
        plan.steps = self.config.steps
        name = self.config.scheduler
        if name == "keep":
            return handle
        import diffusers

        table = FLOW_SCHEDULERS if is_flow_matching(backend.base_scheduler) else SCHEDULERS
        if name not in table:
            raise ValidationError(f"sampler '{name}' does not fit this flow-matching model; use one of {sorted(table)}")
        if name == "lcm" and "lcm" not in backend.model_id.lower():
            raise ValidationError("the LCM sampler needs an LCM-distilled model (or LCM-LoRA); this model is not one")
        cls_name, overrides = table[name]
        handle.on_remove(setattr, backend.pipe, "scheduler", backend.pipe.scheduler)
        backend.pipe.scheduler = getattr(diffusers, cls_name).from_config(backend.base_scheduler.config, **overrides)
        return handle
