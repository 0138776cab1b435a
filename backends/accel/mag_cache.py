"""MagCache (Ma et al. 2025, "MagCache: Fast Video Generation with Magnitude-Aware Cache";
diffusers ``MagCacheConfig``).

The ratio of the magnitudes of the model's residual (output minus input of the block
stack) at consecutive steps is nearly the same for every prompt: it is a property of the
model and the schedule. MagCache accumulates ``|1 - product of ratios|`` as an error
estimate and skips the block stack (reusing the last residual) while the error stays under
``threshold``, at most ``max_skip_steps`` in a row, never in the first ``retention_ratio``
of the steps.

The ratios must be calibrated per checkpoint and schedule. ``ratios="flux"`` uses the
published FLUX.1 curve (diffusers ``FLUX_MAG_RATIOS``, interpolated to the step count);
``ratios="calibrate"`` (default) measures them: the first run for a given model, step
count, size and scheduler runs one extra, untimed pass without skipping to record them,
and later runs reuse the curve: in this process, and, through the studio, after a
restart (the run reports the curve in its stats, the studio keeps it in its calibration
store and hands it back with later requests, ``backends.accel._calibration``). The implementation is diffusers' own
(``transformer.enable_cache``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch

from backends.accel._block_span import block_lists, block_metadata
from backends.accel._calibration import RATIOS, calibration_call, matching_calibration, plan_settings
from backends.accel._diffusers_cache import DiffusersCacheMethod
from backends.accel.base import MethodConfig, MethodSpec, param, register
from backends.plan import UNCOND, DiffusionPlan, tracking_branches
from backends.types import ValidationError


class MagCacheConfig(MethodConfig):
    threshold: float = param(0.06, min=0.0, max=1.0, step=0.01,
                             help="accumulated error allowed before recomputing (diffusers default 0.06; "
                                  "higher = faster)")
    max_skip_steps: int = param(3, min=1, max=10, help="at most this many steps skipped in a row (K)")
    retention_ratio: float = param(0.2, min=0.0, max=1.0, step=0.05,
                                   help="fraction of the first steps that are never skipped")
    ratios: str = param("calibrate", choices=("calibrate", "flux"),
                        help="magnitude ratios: measured for this model (first run per model/steps/size "
                             "pays one extra untimed pass) or the published FLUX.1 curve")


def calibrate_mag_ratios(backend, plan: DiffusionPlan) -> list[float]:
    """Run the plan once (decoding skipped, its own copy of the generator) and record, for the
    first CFG branch, ``mean_tokens(|r_t| / |r_{t-1}|)`` of the block stack's residual."""
    denoiser = backend.denoiser
    blocks = [block for _, block in block_lists(denoiser)]
    if not blocks:
        raise ValidationError(f"mag_cache found no transformer block list in {type(denoiser).__name__}")
    head_meta, tail_meta = block_metadata(blocks[0], "mag_cache"), block_metadata(blocks[-1], "mag_cache")
    guidance = replace(plan.guidance, branch=None)  # this pass's own branch marks
    seen = {"input": None, "previous": None}
    ratios: list[float] = []

    def head(_module, args, kwargs):
        seen["input"] = head_meta._get_parameter_from_args_kwargs(head_meta.hidden_states_argument_name, args, kwargs)

    def tail(_module, _args, _kwargs, output):
        if guidance.branch == UNCOND:  # the conditional branch only (the whole batch when batched)
            return
        out = output[tail_meta.return_hidden_states_index] if isinstance(output, tuple) else output
        residual = (out[:, -seen["input"].shape[1]:] - seen["input"]).float()
        previous = seen["previous"]
        if previous is None:
            ratios.append(1.0)
        else:
            norm, prev_norm = torch.linalg.norm(residual, dim=-1), torch.linalg.norm(previous, dim=-1)
            ratios.append((norm / (prev_norm + 1e-8)).mean().item())
        seen["previous"] = residual

    run = calibration_call(backend, plan)
    handles = [blocks[0].register_forward_pre_hook(head, with_kwargs=True),
               blocks[-1].register_forward_hook(tail, with_kwargs=True)]
    try:
        with torch.no_grad(), tracking_branches(denoiser, guidance):
            backend.pipe(**run)
    finally:
        for handle in handles:
            handle.remove()
    return ratios


@register
class MagCacheMethod(DiffusersCacheMethod):
    spec = MethodSpec(
        name="mag_cache",
        title="MagCache",
        modalities=("image", "video"),
        families=("dit", "video-dit"),
        summary="Skip the block stack while the accumulated error predicted from calibrated "
                "residual-magnitude ratios stays under a threshold.",
        paper="Ma et al. 2025, MagCache: Fast Video Generation with Magnitude-Aware Cache "
              "(arXiv 2506.09045); diffusers implementation",
        lossless=False,
        config=MagCacheConfig,
        slots=("dit-cache",),
    )
    calibrated: ClassVar[dict[tuple, list[float]]] = {}
    skips_whole_calls = True

    def make_config(self, backend, plan: DiffusionPlan, stats: dict[str, Any]):
        from diffusers import hooks

        steps = plan.steps
        stats["calibrated_this_run"] = False
        if self.config.ratios == "flux":
            from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

            ratios = FLUX_MAG_RATIOS
        else:
            ratios = self.calibrated_ratios(backend, plan, stats)
        return hooks.MagCacheConfig(threshold=self.config.threshold, max_skip_steps=self.config.max_skip_steps,
                                    retention_ratio=self.config.retention_ratio, num_inference_steps=steps,
                                    mag_ratios=list(ratios))

    def calibrated_ratios(self, backend, plan: DiffusionPlan, stats: dict[str, Any]) -> list[float]:
        """This model's ratios for this plan: a stored calibration with the same settings
        (handed over with the request), else one measured earlier in this process, else a
        calibration pass now, reported in ``stats["calibration"]`` for the studio to keep."""
        settings = plan_settings(backend, plan)
        stored = matching_calibration(self.calibrations, RATIOS, settings)
        if stored is not None and len(stored["ratios"]) == plan.steps:
            stats["calibration_id"] = stored.get("id")
            return [float(r) for r in stored["ratios"]]
        key = (backend.model_id, id(backend.denoiser), *settings.values())
        if key not in self.calibrated:
            self.calibrated[key] = calibrate_mag_ratios(backend, plan)
            stats["calibrated_this_run"] = True
            stats["calibration"] = {"kind": RATIOS, "ratios": list(self.calibrated[key]), "settings": settings,
                                    "prompts": 1}
        return self.calibrated[key]

    def notes(self, backend, plan: DiffusionPlan) -> list[str]:
        steps = plan.steps
        if self.config.threshold <= 0:
            return ["mag_cache with threshold 0 never skips: no speed-up"]
        if int(self.config.retention_ratio * steps + 0.5) >= steps - 1:
            return [f"mag_cache: retention_ratio {self.config.retention_ratio} keeps all {steps} steps"]
        return []
