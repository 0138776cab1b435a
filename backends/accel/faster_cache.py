"""FasterCache (Lv et al. 2024, "FasterCache: Training-Free Video Diffusion Model
Acceleration with High Quality"; diffusers ``FasterCacheConfig``).

Two caches: attention outputs are reused every other call but *extrapolated* from the
last two computed ones (a weighted difference, not a plain copy); and CFG-Cache: the
unconditional branch is skipped on most steps and rebuilt from the conditional output
plus the cached low/high-frequency difference between the branches. CFG-Cache needs the
pipeline to batch cond and uncond in one call (PixArt, SD3, CogVideoX); for separate
passes (FLUX true CFG) and guidance-distilled models only the attention cache runs, kept
per branch. The implementation is diffusers' own (``transformer.enable_cache``).
"""

from __future__ import annotations

from typing import Any

from backends.accel._diffusers_cache import DiffusersCacheMethod, current_timestep
from backends.accel.base import MethodConfig, MethodSpec, param, register
from backends.plan import DiffusionPlan


class FasterCacheConfig(MethodConfig):
    spatial_skip: int = param(2, min=1, max=10, help="compute spatial attention every N calls (paper: 2)")
    timestep_high: int = param(681, min=0, max=1000,
                               help="attention reuse only below this timestep (0-1000; paper: 681)")
    uncond_skip: int = param(5, min=1, max=20,
                             help="CFG-Cache: compute the unconditional branch every N steps (paper: 5); "
                                  "batched-CFG pipelines only")
    uncond_timestep_high: int = param(641, min=0, max=1000, help="CFG-Cache only below this timestep (paper: 641)")
    alpha: float = param(1.1, min=0.5, max=2.0, step=0.05,
                         help="weight of the low/high-frequency CFG difference (paper: 1.1)")


def batches_cfg(plan: DiffusionPlan) -> bool:
    """True when cond and uncond go through the denoiser as one batch."""
    return plan.guidance.passes == 2 and plan.guidance.batched


@register
class FasterCacheMethod(DiffusersCacheMethod):
    spec = MethodSpec(
        name="faster_cache",
        title="FasterCache",
        modalities=("image", "video"),
        families=("dit", "video-dit"),
        summary="Extrapolate attention outputs from the last two computed calls, and rebuild the "
                "unconditional CFG branch from the conditional one on most steps.",
        paper="Lv et al. 2024, FasterCache: Training-Free Video Diffusion Model Acceleration with High Quality "
              "(arXiv 2410.19355); diffusers implementation",
        lossless=False,
        config=FasterCacheConfig,
        slots=("dit-cache", "guidance"),  # CFG-Cache rebuilds the unconditional branch
    )
    per_branch_hooks = ("faster_cache_block", "faster_cache_denoiser")

    def make_config(self, backend, plan: DiffusionPlan, stats: dict[str, Any]):
        from diffusers import hooks

        c = self.config
        return hooks.FasterCacheConfig(
            spatial_attention_block_skip_range=c.spatial_skip,
            spatial_attention_timestep_skip_range=(-1, c.timestep_high),
            unconditional_batch_skip_range=c.uncond_skip,
            unconditional_batch_timestep_skip_range=(-1, c.uncond_timestep_high),
            alpha_low_frequency=c.alpha, alpha_high_frequency=c.alpha,
            attention_weight_callback=lambda _module: 0.5,
            tensor_format="BCFHW" if backend.modality == "video" else "BCHW",
            is_guidance_distilled=not batches_cfg(plan),
            current_timestep_callback=current_timestep(backend),
        )

    def notes(self, backend, plan: DiffusionPlan) -> list[str]:
        notes = []
        if self.config.spatial_skip <= 1 and (self.config.uncond_skip <= 1 or not batches_cfg(plan)):
            notes.append("faster_cache with spatial_skip 1 and no CFG-Cache reuses nothing")
        if plan.guidance.passes == 2 and not batches_cfg(plan):
            notes.append("faster_cache: this pipeline runs CFG as separate passes, so CFG-Cache is off "
                         "(only the attention cache runs)")
        return notes
