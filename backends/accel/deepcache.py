"""DeepCache (Ma et al., CVPR 2024): reuse the UNet's deep features across steps.

Adjacent denoising steps change the deep, low-resolution features of a UNet very little.
Every ``interval``-th step runs the full UNet and caches the feature entering the
shallow up blocks; the steps in between run only the shallow branch (``conv_in``, the
first ``branch + 1`` down blocks, the last ``branch + 1`` up blocks) on that cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from backends.accel._eval_cost import EvalCostMeter
from backends.accel._patch import ForwardPatch, StepCallback
from backends.accel.base import Limits, Method, MethodConfig, MethodSpec, param, register
from backends.plan import DiffusionPlan, RunHandle


class DeepCacheConfig(MethodConfig):
    interval: int = param(3, min=1, max=10, help="run the full UNet every N steps (paper: 3-5)")
    branch: int = param(0, min=0, max=3,
                        help="depth of the shallow branch that is recomputed (0 = outermost level only, fastest)")


@dataclass
class DeepCacheState:
    cached: torch.Tensor | None = None
    full_steps: int = 0
    shallow_steps: int = 0


def shallow_forward(unet, branch: int, cached: torch.Tensor, sample, timestep, encoder_hidden_states,
                    timestep_cond=None, attention_mask=None, cross_attention_kwargs=None,
                    added_cond_kwargs=None, encoder_attention_mask=None, return_dict=True, **_unused):
    """The UNet forward restricted to its outer ``branch + 1`` levels, reading the deep
    part from ``cached``. Mirrors ``UNet2DConditionModel.forward`` step by step."""
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, timestep_cond)
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs)
    emb = emb + aug_emb if aug_emb is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )
    sample = unet.conv_in(sample)
    res_samples_all: tuple[torch.Tensor, ...] = (sample,)
    for block in unet.down_blocks[: branch + 1]:
        if getattr(block, "has_cross_attention", False):
            sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states,
                                attention_mask=attention_mask, cross_attention_kwargs=cross_attention_kwargs,
                                encoder_attention_mask=encoder_attention_mask)
        else:
            sample, res = block(hidden_states=sample, temb=emb)
        res_samples_all += res
    up_blocks = unet.up_blocks[len(unet.up_blocks) - branch - 1:]
    needed = sum(len(block.resnets) for block in up_blocks)
    res_samples_all = res_samples_all[:needed]
    if cached.shape[0] != sample.shape[0] and cached.shape[0] == 2 * sample.shape[0]:
        cached = cached.chunk(2)[1]  # guidance was switched off mid-run: keep the cond half
    sample = cached
    for i, block in enumerate(up_blocks):
        res = res_samples_all[-len(block.resnets):]
        res_samples_all = res_samples_all[: -len(block.resnets)]
        upsample_size = res_samples_all[-1].shape[2:] if i < len(up_blocks) - 1 and res_samples_all else None
        if getattr(block, "has_cross_attention", False):
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                           encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs,
                           upsample_size=upsample_size, attention_mask=attention_mask,
                           encoder_attention_mask=encoder_attention_mask)
        else:
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=upsample_size)
    if unet.conv_norm_out:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    sample = unet.conv_out(sample)
    if not return_dict:
        return (sample,)
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample)


@register
class DeepCacheMethod(Method):
    spec = MethodSpec(
        name="deepcache",
        title="DeepCache",
        modalities=("image", "audio"),
        families=("unet", "audio-unet"),
        summary="Full UNet every N steps; in between only the shallow branch runs on cached deep features.",
        paper="Ma et al. 2024, DeepCache: Accelerating Diffusion Models for Free (CVPR)",
        lossless=False,
        config=DeepCacheConfig,
    )

    @classmethod
    def limits(cls, backend) -> Limits:
        """The branch must leave at least one level below it cached: below the number of
        up blocks minus one (the bundled SD UNet has 3 levels: branch 0 or 1)."""
        unet = getattr(getattr(backend, "pipe", None), "unet", None)
        if unet is None or not hasattr(unet, "get_time_embed") or len(unet.up_blocks) < 2:
            return Limits(unfit="DeepCache needs a diffusers UNet2DConditionModel with at least two levels")
        return Limits(ranges={"branch": (None, len(unet.up_blocks) - 2)})

    def attach(self, backend, plan: DiffusionPlan) -> RunHandle:
        unet = backend.pipe.unet
        state, counter, interval, branch = DeepCacheState(), StepCallback(), self.config.interval, self.config.branch
        plan.callbacks.append(counter)
        target = unet.up_blocks[len(unet.up_blocks) - branch - 1]

        def capture(_module, args, kwargs):
            state.cached = kwargs.get("hidden_states", args[0] if args else None)

        def make_forward(original):
            def forward(sample, timestep, encoder_hidden_states, *args, **kwargs):
                if state.cached is None or counter.step % interval == 0:
                    state.full_steps += 1
                    handle = target.register_forward_pre_hook(capture, with_kwargs=True)
                    try:
                        return original(sample, timestep, encoder_hidden_states, *args, **kwargs)
                    finally:
                        handle.remove()
                state.shallow_steps += 1
                costs.mark_partial()
                return shallow_forward(unet, branch, state.cached, sample, timestep, encoder_hidden_states,
                                       *args, **kwargs)

            return forward

        costs = EvalCostMeter(unet)  # full vs shallow call costs, for the ideal speedup
        handle = RunHandle(plan, lambda: self.run_stats(state, costs), self.notes)
        handle.on_remove(costs.remove)
        with handle.undo_on_error():
            handle.on_remove(ForwardPatch(unet, make_forward).remove)
        return handle

    @staticmethod
    def run_stats(state: DeepCacheState, costs: EvalCostMeter) -> dict[str, Any]:
        total = state.full_steps + state.shallow_steps
        return {
            "full_steps": state.full_steps,
            "shallow_steps": state.shallow_steps,
            "cache_hit_rate": round(state.shallow_steps / total, 3) if total else 0.0,
            **costs.stats(),
        }

    def notes(self, plan: DiffusionPlan) -> list[str]:
        steps = plan.steps
        if self.config.interval <= 1:
            return ["DeepCache with interval 1 recomputes every step: it cannot speed anything up"]
        if steps <= self.config.interval:
            return [f"DeepCache at {steps} steps with interval {self.config.interval} skips at most "
                    f"{steps - 1} step(s): little or no speed-up"]
        return []
