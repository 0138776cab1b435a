"""CFG truncation: stop classifier-free guidance after a fraction of the steps.

Late steps refine detail that guidance barely changes, so dropping the unconditional
pass there halves their cost (Kynkäänniemi et al. 2024, "Applying guidance in a limited
interval"; the "dynamic CFG" recipe of the diffusers docs).

Pipelines that gate CFG per step (SD, SDXL, PixArt with one call on [uncond, cond]; Wan
with separate passes) have guidance switched off from the step-end callback; true-CFG
pipelines (FLUX) have the unconditional call answered with the conditional output, which
makes ``uncond + s * (cond - uncond)`` exactly ``cond`` without running it. The plan says
which branch each denoiser call is (the pipeline's own ``cache_context`` marks).
"""

from __future__ import annotations

import math
from typing import Any

from backends.accel._patch import ForwardPatch, StepCallback
from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.plan import COND, UNCOND, DiffusionPlan, RunHandle
from backends.types import ValidationError
from backends.timing import REUSED, mark_call

BATCHED_CFG_INPUTS = ("prompt_embeds", "add_text_embeds", "add_time_ids")


class _TruncateBatchedCFG:
    """Step-end callback: at the cut, guidance off and the embeddings cut to the cond half."""

    def __init__(self, handle: "CFGTruncationHandle", tensor_inputs: tuple[str, ...]):
        self.handle, self.tensor_inputs = handle, tensor_inputs

    def __call__(self, pipe, step, timestep, kwargs) -> dict[str, Any]:
        self.handle.step = step + 1
        if self.handle.step != self.handle.cut:
            return {}
        pipe._guidance_scale = 0.0
        return {name: kwargs[name].chunk(2)[-1] for name in self.tensor_inputs if name in kwargs}


class CFGTruncationConfig(MethodConfig):
    fraction: float = param(0.5, min=0.0, max=1.0, step=0.05,
                            help="fraction of steps that keep guidance; 1.0 = normal CFG")


@register
class CFGTruncationMethod(Method):
    spec = MethodSpec(
        name="cfg_truncation",
        title="CFG truncation",
        modalities=("image", "video", "audio"),
        families=("unet", "dit", "video-dit", "audio-unet", "audio-dit"),
        summary="Run classifier-free guidance only for the first part of the steps.",
        paper="Kynkäänniemi et al. 2024, Applying Guidance in a Limited Interval",
        lossless=False,
        config=CFGTruncationConfig,
        slots=("guidance",),
    )

    def attach(self, backend, plan: DiffusionPlan) -> "CFGTruncationHandle":
        handle = CFGTruncationHandle(plan, max(1, math.ceil(self.config.fraction * plan.steps)), self.config.fraction)
        if plan.guidance.passes < 2 or handle.cut >= plan.steps:
            return handle  # nothing to drop: the warnings say so
        pipe = backend.pipe
        if hasattr(type(pipe), "do_classifier_free_guidance"):  # the pipeline gates CFG per step
            inputs = BATCHED_CFG_INPUTS if plan.guidance.batched else ()  # (Wan: separate passes, gated)
            inputs = tuple(n for n in inputs if n in getattr(pipe, "_callback_tensor_inputs", ()))
            plan.callbacks.append(_TruncateBatchedCFG(handle, inputs))
        elif plan.guidance.separate:  # FLUX true CFG: answer the uncond pass with the cond output
            plan.callbacks.append(StepCallback(handle.on_step))
            with handle.undo_on_error():
                handle.on_remove(ForwardPatch(pipe.transformer, handle.reuse_cond).remove)
        else:
            raise ValidationError("CFG truncation does not know how this pipeline applies guidance")
        return handle


class CFGTruncationHandle(RunHandle):
    """One run: the step reached, the cut, and the unconditional passes answered."""

    def __init__(self, plan: DiffusionPlan, cut: int, fraction: float):
        super().__init__(plan)
        self.cut, self.fraction, self.step, self.skipped = cut, fraction, 0, 0
        self.cond: tuple[int, Any] | None = None  # (step, output) of the last conditional pass

    def on_step(self, step: int) -> None:
        self.step = step

    def reuse_cond(self, original):
        guidance = self.plan.guidance

        def forward(*args, **kwargs):
            # the plan names the branch of each call: no assumption on the order of the passes;
            # an unconditional pass is answered only by this step's conditional output
            if guidance.branch == UNCOND and self.step >= self.cut and self.cond and self.cond[0] == self.step:
                self.skipped += 1
                mark_call(REUSED)  # the timeline shows the uncond pass answered
                return self.cond[1]
            out = original(*args, **kwargs)
            if guidance.branch == COND:
                self.cond = (self.step, out)
            return out

        return forward

    def skipped_evals(self) -> int:
        return self.skipped

    def stats(self) -> dict[str, Any]:
        guided = min(self.cut, self.plan.steps)
        return {"guided_steps": guided, "unguided_steps": self.plan.steps - guided, "skipped_evals": self.skipped}

    def warnings(self) -> list[str]:
        if self.plan.guidance.passes < 2:
            return ["CFG truncation does nothing here: guidance is off (scale <= 1), so there is no second pass to drop"]
        if self.cut >= self.plan.steps:
            return [f"CFG truncation does nothing at fraction {self.fraction}: every step keeps guidance"]
        return []
