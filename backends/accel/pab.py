"""Pyramid Attention Broadcast (Zhao et al. 2024, "Real-Time Video Generation with Pyramid
Attention Broadcast"; diffusers ``PyramidAttentionBroadcastConfig``).

Attention outputs change little between neighbouring steps in the middle of sampling,
and the less the more "global" the attention: cross > temporal > spatial. PAB computes
each attention layer every N-th call within a timestep window and broadcasts (reuses) the
last output in between, with a longer range for the more stable kinds (the pyramid).
The implementation is diffusers' own (``transformer.enable_cache``); we keep its state per
CFG branch for pipelines that run cond and uncond as separate calls.
"""

from __future__ import annotations

from typing import Any

from backends.accel._diffusers_cache import DiffusersCacheMethod, current_timestep
from backends.accel.base import Limits, MethodConfig, MethodSpec, param, register
from backends.plan import DiffusionPlan
from backends.types import ValidationError


class PABConfig(MethodConfig):
    spatial_skip: int = param(2, min=0, max=10,
                              help="compute spatial self-attention every N calls (paper: 2); 0 = never reuse")
    temporal_skip: int = param(4, min=0, max=10,
                               help="same for temporal attention of video models (paper: 4); 0 = off")
    cross_skip: int = param(6, min=0, max=10, help="same for cross-attention layers (paper: 6); 0 = off")
    timestep_low: int = param(100, min=0, max=1000, help="reuse only while the timestep (0-1000) is above this...")
    timestep_high: int = param(800, min=0, max=1000, help="...and below this (paper: 100-800)")


@register
class PABMethod(DiffusersCacheMethod):
    spec = MethodSpec(
        name="pab",
        title="Pyramid Attention Broadcast",
        modalities=("image", "video"),
        families=("dit", "video-dit"),
        summary="Reuse each attention layer's output for N-1 calls inside a timestep window; "
                "longer ranges for cross and temporal attention than for spatial.",
        paper="Zhao et al. 2024, Real-Time Video Generation with Pyramid Attention Broadcast "
              "(arXiv 2408.12588); diffusers implementation",
        lossless=False,
        config=PABConfig,
        slots=("dit-cache",),
    )
    per_branch_hooks = ("pyramid_attention_broadcast",)

    @classmethod
    def limits(cls, backend) -> Limits:
        """The reuse window is not empty: timestep_low < timestep_high (any model)."""
        return Limits(ranges={"timestep_low": (None, cls.spec.param("timestep_high").max - 1),
                              "timestep_high": (("timestep_low", 1), None)})

    def make_config(self, backend, plan: DiffusionPlan, stats: dict[str, Any]):
        from diffusers.hooks import PyramidAttentionBroadcastConfig

        c = self.config
        window = (c.timestep_low, c.timestep_high)
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=c.spatial_skip or None,
            temporal_attention_block_skip_range=c.temporal_skip or None,
            cross_attention_block_skip_range=c.cross_skip or None,
            spatial_attention_timestep_skip_range=window, temporal_attention_timestep_skip_range=window,
            cross_attention_timestep_skip_range=window,
            current_timestep_callback=current_timestep(backend),
        )

    def attach(self, backend, plan: DiffusionPlan):
        if max(self.config.spatial_skip, self.config.temporal_skip, self.config.cross_skip) <= 1:
            raise ValidationError("pab needs at least one skip range above 1 (spatial, temporal or cross)")
        return super().attach(backend, plan)

    def notes(self, backend, plan: DiffusionPlan) -> list[str]:
        if plan.steps < 3:
            return ["pab reuses attention only between computed calls: with fewer than 3 steps it saves little"]
        return []
