"""CFG truncation: stop classifier-free guidance after a fraction of the steps.

Late steps refine detail that guidance barely changes, so dropping the unconditional
pass there halves their cost (Kynkäänniemi et al. 2024, "Applying guidance in a limited
interval"; the "dynamic CFG" recipe of the diffusers docs).

Two pipeline shapes are handled: batched CFG (SD, SDXL, PixArt: one call on
[uncond, cond]) by switching guidance off from the step-end callback, and separate
passes (FLUX true CFG, Wan) by answering the unconditional call with the conditional
output, which makes ``uncond + s * (cond - uncond)`` exactly ``cond`` without running it.
"""

from __future__ import annotations

import math
from typing import Any

from backends.accel._patch import ForwardPatch, add_callback
from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.types import ValidationError

BATCHED_CFG_INPUTS = ("prompt_embeds", "add_text_embeds", "add_time_ids")


class _TruncateBatchedCFG:
    """Step-end callback: at the cut, guidance off and the embeddings cut to the cond half."""

    def __init__(self, method: "CFGTruncationMethod", cut: int, tensor_inputs: tuple[str, ...]):
        self.method, self.cut, self.tensor_inputs = method, cut, tensor_inputs

    def __call__(self, pipe, step, timestep, kwargs) -> dict[str, Any]:
        self.method.step = step + 1
        if self.method.step != self.cut:
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

    def apply(self, backend) -> None:
        self.step = 0
        self.skipped_passes = 0
        self._patch = None

    def remove(self, backend) -> None:
        if self._patch is not None:
            self._patch.remove()
            self._patch = None

    def prepare_call(self, backend, call: dict[str, Any]) -> dict[str, Any]:
        steps = call["num_inference_steps"]
        self.cut = max(1, math.ceil(self.config.fraction * steps))
        self.steps = steps
        if backend.cfg_passes(call) < 2 or self.cut >= steps:
            return call
        pipe = backend.pipe
        if backend.cfg_batched and hasattr(type(pipe), "do_classifier_free_guidance"):
            inputs = tuple(n for n in BATCHED_CFG_INPUTS if n in getattr(pipe, "_callback_tensor_inputs", ()))
            return add_callback(call, _TruncateBatchedCFG(self, self.cut, inputs))
        if hasattr(type(pipe), "do_classifier_free_guidance"):  # separate passes gated per step (Wan)
            return add_callback(call, _TruncateBatchedCFG(self, self.cut, ()))
        if "true_cfg_scale" in call:
            self._separate = True
            return add_callback(call, self._count_step)
        raise ValidationError("CFG truncation does not know how this pipeline applies guidance")

    def _count_step(self, pipe, step, timestep, kwargs):
        self.step = step + 1
        if self.step == self.cut and self._patch is None:
            self._patch = ForwardPatch(pipe.transformer, self._reuse_cond)
        return {}

    _count_step.tensor_inputs = ()  # type: ignore[attr-defined]

    def _reuse_cond(self, original):
        calls = {"n": 0, "cond": None}

        def forward(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] % 2 == 1:  # FLUX order per step: cond first, then uncond
                calls["cond"] = original(*args, **kwargs)
                return calls["cond"]
            self.skipped_passes += 1
            return calls["cond"]

        return forward

    def stats(self) -> dict[str, Any]:
        guided = min(getattr(self, "cut", 0), getattr(self, "steps", 0))
        return {
            "guided_steps": guided,
            "unguided_steps": getattr(self, "steps", 0) - guided,
            "skipped_evals": self.skipped_passes,
        }

    def warnings(self, backend, call) -> list[str]:
        if backend.cfg_passes(call) < 2:
            return ["CFG truncation does nothing here: guidance is off (scale <= 1), so there is no second pass to drop"]
        if self.cut >= call["num_inference_steps"]:
            return [f"CFG truncation does nothing at fraction {self.config.fraction}: every step keeps guidance"]
        return []
