"""Sampler swap and step count: the oldest speed-up, fewer and better-spent steps.

DDIM (Song et al. 2021), DPM-Solver++ 2M and 3M, with their SDE variants (Lu et al. 2022),
UniPC (Zhao et al. 2023), DEIS (Zhang and Chen 2023), PNDM (Liu et al. 2022), Euler (Karras et
al. 2022), LCM (Luo et al. 2023, needs an LCM-distilled model). All are diffusers' own
schedulers, configured here. Flow-matching models (FLUX, SD3, Wan) take the solvers that have
a flow-sigma form (diffusers' ``use_flow_sigmas``); PNDM and LCM have none. DPM-Solver v3
(Zheng et al. 2023) needs per-model statistics and has no diffusers scheduler: not offered.

The SDE solvers draw fresh noise at every step from the run's seeded generator (handed to
``scheduler.step`` where a pipeline does not pass it), so a run stays reproducible from its
seed. A flow solver keeps the model's own sigma shift (static or resolution-dependent).
"""

from __future__ import annotations

import functools
from typing import Any

from backends.accel.base import Limits, Method, MethodConfig, MethodSpec, param, register
from backends.plan import DiffusionPlan, RunHandle
from backends.types import ValidationError

SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "deis": ("DEISMultistepScheduler", {"solver_order": 3}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}
_FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
FLOW_SCHEDULERS = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", _FLOW),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {**_FLOW, "algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_3m": ("DPMSolverMultistepScheduler", {**_FLOW, "algorithm_type": "dpmsolver++", "solver_order": 3}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {**_FLOW, "algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "deis": ("DEISMultistepScheduler", {**_FLOW, "solver_order": 3}),
}


def is_flow_matching(scheduler: Any) -> bool:
    return "FlowMatch" in type(scheduler).__name__ or bool(getattr(scheduler.config, "use_flow_sigmas", False))


class SamplerConfig(MethodConfig):
    scheduler: str = param("keep", choices=("keep", "ddim", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "dpmpp_3m_sde",
                                                      "unipc", "deis", "pndm", "euler", "lcm"),
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
        paper="DPM-Solver++ (Lu et al. 2022); UniPC (Zhao et al. 2023); DEIS (Zhang and Chen 2023); "
              "PNDM (Liu et al. 2022)",
        lossless=False,
        config=SamplerConfig,
    )
    attach_first = True  # the other methods read the scheduler and the step count it sets

    @classmethod
    def limits(cls, backend) -> Limits:
        """A flow-matching model takes the solvers with a flow-sigma form, a noise-prediction
        model the others; LCM only fits an LCM-distilled model."""
        table = FLOW_SCHEDULERS if is_flow_matching(backend.base_scheduler) else SCHEDULERS
        fits = [name for name in cls.spec.param("scheduler").choices
                if name == "keep" or name in table and (name != "lcm" or "lcm" in backend.model_id.lower())]
        return Limits(choices={"scheduler": tuple(fits)})

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
        base = backend.base_scheduler
        if table is FLOW_SCHEDULERS:
            overrides = {**overrides, **flow_shift_of(base)}
        scheduler = getattr(diffusers, cls_name).from_config(base.config, **overrides)
        if table is FLOW_SCHEDULERS and not base.config.get("use_dynamic_shifting", False):
            ignore_mu(scheduler)
        if "sde" in str(scheduler.config.get("algorithm_type", "")):
            seed_step_noise(scheduler, plan.kwargs.get("generator"))
        backend.pipe.scheduler = scheduler
        return handle


def flow_shift_of(base: Any) -> dict[str, Any]:
    """The flow model's own sigma shift in the multistep solvers' terms, so a swapped solver
    walks the same noise levels as the model's scheduler (Wan-style models train with a
    static shift of 3-5; FLUX shifts by resolution through ``mu``)."""
    config = base.config
    if config.get("use_dynamic_shifting", False):
        return {"use_dynamic_shifting": True, "time_shift_type": config.get("time_shift_type", "exponential")}
    return {"flow_shift": float(config.get("shift", 1.0))}


def ignore_mu(scheduler: Any) -> None:
    """FLUX-style pipelines always pass ``mu`` (the resolution shift) to ``set_timesteps``;
    a flow Euler scheduler without dynamic shifting ignores it, diffusers' multistep solvers
    assert on it instead. Drop it, as the model's own scheduler would."""
    original = scheduler.set_timesteps

    @functools.wraps(original)
    def set_timesteps(*args: Any, mu: Any = None, **kwargs: Any) -> Any:
        return original(*args, **kwargs)

    scheduler.set_timesteps = set_timesteps


def seed_step_noise(scheduler: Any, generator: Any) -> None:
    """An SDE solver draws noise in every ``step``; pipelines that do not pass their
    generator to ``step`` (FLUX, Wan) would leave it to torch's global RNG, and one seed
    would no longer mean one image. Hand it the run's seeded generator instead."""
    if generator is None:
        return
    original = scheduler.step

    @functools.wraps(original)
    def step(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("generator") is None:
            kwargs["generator"] = generator
        return original(*args, **kwargs)

    scheduler.step = step
