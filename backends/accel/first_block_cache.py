"""First Block Cache (ParaAttention, Cheng 2025; diffusers ``FirstBlockCacheConfig``).

The first block always runs; if its residual changed (relative mean absolute difference)
less than ``threshold`` since the last computed step, the remaining blocks are skipped and
their cached residual is added instead. A TeaCache-like signal that needs no per-model
fit. The implementation is diffusers' own (``transformer.enable_cache``).
"""

from __future__ import annotations

from typing import Any

from backends.accel._diffusers_cache import DiffusersCacheMethod
from backends.accel.base import MethodConfig, MethodSpec, param, register
from backends.plan import DiffusionPlan


class FirstBlockCacheConfig(MethodConfig):
    threshold: float = param(0.05, min=0.0, max=1.0, step=0.01, paper="0.08-0.12 on FLUX.1 for ~2x",
                             help="relative change of the first block's residual below which the rest is "
                                  "skipped (diffusers default 0.05)")


@register
class FirstBlockCacheMethod(DiffusersCacheMethod):
    spec = MethodSpec(
        name="first_block_cache",
        title="First Block Cache",
        modalities=("image", "video"),
        families=("dit", "video-dit"),
        summary="Run the first block; skip the rest (adding their cached residual) while the first "
                "block's residual changes less than a threshold.",
        paper="Cheng 2025, ParaAttention First Block Cache (after TeaCache, Liu et al. 2024); diffusers implementation",
        lossless=False,
        config=FirstBlockCacheConfig,
        slots=("dit-cache",),
    )

    def make_config(self, backend, plan: DiffusionPlan, stats: dict[str, Any]):
        from diffusers import hooks

        return hooks.FirstBlockCacheConfig(threshold=self.config.threshold)

    def notes(self, backend, plan: DiffusionPlan) -> list[str]:
        if self.config.threshold <= 0:
            return ["first_block_cache with threshold 0 never skips: no speed-up"]
        if plan.steps < 2:
            return ["first_block_cache needs at least 2 steps to reuse anything"]
        return []
