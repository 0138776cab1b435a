"""TaylorSeer (Liu et al. 2025, "From Reusing to Forecasting: Accelerating Diffusion
Models with TaylorSeers"; diffusers ``TaylorSeerCacheConfig``).

Instead of reusing a cached feature as is, forecast it: every ``interval`` steps the
attention outputs are computed and their finite differences kept; in between they are
predicted by a Taylor expansion of order ``max_order`` in the step offset. The
implementation is diffusers' own (``transformer.enable_cache``).
"""

from __future__ import annotations

from typing import Any

import torch

from backends.accel._diffusers_cache import DiffusersCacheMethod
from backends.accel.base import MethodConfig, MethodSpec, param, register
from backends.plan import DiffusionPlan


class TaylorSeerConfig(MethodConfig):
    interval: int = param(5, min=1, max=20,
                          help="a full computation every N steps (diffusers/paper default 5); 1 = never forecast")
    warmup_steps: int = param(3, min=0, max=50,
                              help="first steps always computed, to gather the differences the forecast needs")
    max_order: int = param(1, min=0, max=4, paper=2,
                           help="Taylor order (0 = plain reuse, 1 = linear extrapolation, 2 = the paper's best "
                                "quality)")
    lite: bool = param(False, help="TaylorSeer-Lite: forecast only the final projection, skip whole blocks "
                                   "(least memory)")


@register
class TaylorSeerMethod(DiffusersCacheMethod):
    spec = MethodSpec(
        name="taylorseer",
        title="TaylorSeer",
        modalities=("image", "video"),
        families=("dit", "video-dit"),
        summary="Compute attention every N steps and forecast it in between with a Taylor expansion "
                "over past steps.",
        paper="Liu et al. 2025, From Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers "
              "(arXiv 2503.06923); diffusers implementation",
        lossless=False,
        config=TaylorSeerConfig,
        slots=("dit-cache",),
    )

    def make_config(self, backend, plan: DiffusionPlan, stats: dict[str, Any]):
        from diffusers.hooks import TaylorSeerCacheConfig

        dtype = next(backend.denoiser.parameters()).dtype
        return TaylorSeerCacheConfig(
            cache_interval=self.config.interval, disable_cache_before_step=self.config.warmup_steps,
            max_order=self.config.max_order, use_lite_mode=self.config.lite,
            taylor_factors_dtype=dtype if dtype != torch.float16 else torch.float32,
        )

    def whole_call_skips(self) -> bool:
        return self.config.lite  # Lite skips every block; the full mode forecasts attention only

    def notes(self, backend, plan: DiffusionPlan) -> list[str]:
        steps = plan.steps
        if self.config.interval <= 1:
            return ["taylorseer with interval 1 computes every step: no speed-up"]
        if steps <= self.config.warmup_steps + 1:
            return [f"taylorseer: {steps} steps are all warm-up steps ({self.config.warmup_steps}), "
                    "nothing is forecast"]
        return []
