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

from backends.accel._diffusers_cache import DIT_CACHES, DiffusersCacheMethod
from backends.accel.base import MethodSpec, Param, register
from backends.types import ValidationError


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
        params=(
            Param("spatial_skip", "int", 2, min=0, max=10,
                  help="compute spatial self-attention every N calls (paper: 2); 0 = never reuse"),
            Param("temporal_skip", "int", 4, min=0, max=10,
                  help="same for temporal attention of video models (paper: 4); 0 = off"),
            Param("cross_skip", "int", 6, min=0, max=10,
                  help="same for cross-attention layers (paper: 6); 0 = off"),
            Param("timestep_low", "int", 100, min=0, max=1000,
                  help="reuse only while the timestep (0-1000) is above this..."),
            Param("timestep_high", "int", 800, min=0, max=1000, help="...and below this (paper: 100-800)"),
        ),
        conflicts=tuple(n for n in DIT_CACHES if n != "pab"),
    )
    per_branch_hooks = ("pyramid_attention_broadcast",)

    def make_config(self, backend, call: dict[str, Any]):
        from diffusers.hooks import PyramidAttentionBroadcastConfig

        p = self.params
        if p["timestep_low"] >= p["timestep_high"]:
            raise ValidationError("pab: timestep_low must be below timestep_high")
        window = (p["timestep_low"], p["timestep_high"])
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=p["spatial_skip"] or None,
            temporal_attention_block_skip_range=p["temporal_skip"] or None,
            cross_attention_block_skip_range=p["cross_skip"] or None,
            spatial_attention_timestep_skip_range=window, temporal_attention_timestep_skip_range=window,
            cross_attention_timestep_skip_range=window,
            current_timestep_callback=self.current_timestep(backend),
        )

    def apply(self, backend) -> None:
        if not any(self.params[k] > 1 for k in ("spatial_skip", "temporal_skip", "cross_skip")):
            raise ValidationError("pab needs at least one skip range above 1 (spatial, temporal or cross)")
        super().apply(backend)

    def warnings(self, backend, call) -> list[str]:
        if call["num_inference_steps"] < 3:
            return ["pab reuses attention only between computed calls: with fewer than 3 steps it saves little"]
        return []
