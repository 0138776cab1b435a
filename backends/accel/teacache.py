"""TeaCache (Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for Video
Diffusion Model"): skip the whole block stack while its input has barely changed.

The timestep-modulated input of the first block (FLUX: ``norm1(hidden_states, temb)`` of
the image stream) is a cheap proxy for how much the model output will change. TeaCache
accumulates the relative L1 change of that input from step to step, rescaled by a
polynomial fitted per model, and while the sum stays under ``threshold`` it answers the
step with ``input + residual`` of the last computed step; when the sum crosses the
threshold it computes the step and resets the sum. The first and last steps are always
computed. Each CFG branch (cond / uncond) keeps its own accumulator and residual.

The published polynomial fits FLUX.1 only; for any other model ``rescale="calibrated"``
(or ``"auto"`` once one is stored) uses the model's own fit, made by TeaCache's procedure
in ``backends.accel._calibration.fit_rescale_curve`` and handed to the method with the
request (``Method.calibrations``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from backends.accel._block_span import SpanCache, block_lists, block_metadata, span_handle
from backends.accel._calibration import RESCALE, matching_calibration, plan_settings
from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.plan import DiffusionPlan, RunHandle
from backends.types import ValidationError

# Published rescaling polynomial for FLUX.1 (TeaCache4FLUX), highest power first.
FLUX_COEFFICIENTS = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)


class TeaCacheConfig(MethodConfig):
    """On FLUX.1 the paper reports threshold 0.25 ≈ 1.5x, 0.4 ≈ 1.8x, 0.6 ≈ 2.0x, 0.8 ≈ 2.25x,
    with visible drift from 0.6. Set at run time: ``coefficients``, the rescaling polynomial
    (highest power first; empty = no rescaling), and ``num_steps``, the run's steps, so the
    last one is always computed (0 = unknown)."""

    threshold: float = param(0.4, min=0.0, max=2.0, step=0.05,
                             help="accumulated change allowed before recomputing; FLUX.1: 0.25 ≈ 1.5x, 0.4 ≈ 1.8x, "
                                  "0.6 ≈ 2x, 0.8 ≈ 2.25x (paper); higher = faster and rougher")
    coefficients: tuple[float, ...] = FLUX_COEFFICIENTS
    num_steps: int = 0
    rescale: str = param("auto", choices=("auto", "flux", "none", "calibrated"),
                         help="rescaling polynomial: the published FLUX.1 fit, none (raw relative L1), this "
                              "model's own fit (calibrated: made in the Calibrate tab), or auto (the model's "
                              "own fit when one is stored, else the FLUX fit for FLUX transformers, else none)")


def rescale(value: float, coefficients: tuple[float, ...]) -> float:
    if not coefficients:
        return value
    out = 0.0
    for c in coefficients:
        out = out * value + c
    return out


def modulated_input(block: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The first block's timestep-modulated image input: ``norm1(hidden_states, emb=temb)``
    for AdaLN-Zero blocks (FLUX, SD3, HunyuanVideo); the timestep embedding itself for
    blocks without one (the signal TeaCache uses for Wan-style models)."""
    meta = block_metadata(block, "teacache")
    hidden = meta._get_parameter_from_args_kwargs(meta.hidden_states_argument_name, args, kwargs)
    temb = kwargs.get("temb")
    norm1 = getattr(block, "norm1", None)
    if norm1 is not None and temb is not None:
        out = norm1(hidden, emb=temb)
        return out[0] if isinstance(out, tuple) else out
    if temb is not None:
        return temb
    return hidden


def apply_teacache(denoiser, config: TeaCacheConfig, pipe=None) -> SpanCache:
    """Hook every block of ``denoiser``; returns the handle whose ``remove()`` undoes it.
    With ``pipe``, the step count is read from the running pipeline (``_num_timesteps``),
    so it is right even when another method changed it after this one was configured.

    >>> cache = apply_teacache(pipe.transformer, TeaCacheConfig(threshold=0.4, num_steps=28))
    >>> image = pipe("a red circle", num_inference_steps=28).images[0]
    >>> cache.remove()
    """
    blocks = [block for _, block in block_lists(denoiser)]

    def reuse(module, args, kwargs, state) -> bool:
        with torch.no_grad():
            current = modulated_input(module, args, kwargs)
        previous = state.extra.get("modulated")
        state.extra["modulated"] = current
        step = state.calls
        steps = getattr(pipe, "_num_timesteps", None) or config.num_steps
        last = steps > 0 and step >= steps - 1
        if previous is None or step == 0 or last or previous.shape != current.shape:
            state.extra["accumulated"] = 0.0
            return False
        change = ((current - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12)).item()
        accumulated = state.extra.get("accumulated", 0.0) + rescale(change, config.coefficients)
        if accumulated < config.threshold:
            state.extra["accumulated"] = accumulated
            return True
        state.extra["accumulated"] = 0.0
        return False

    return SpanCache(denoiser, blocks, reuse, "teacache")


@register
class TeaCacheMethod(Method):
    spec = MethodSpec(
        name="teacache",
        title="TeaCache",
        modalities=("image", "video"),
        families=("dit", "video-dit"),
        summary="Skip the whole block stack, reusing its last residual, while the timestep-modulated "
                "input has changed less than a threshold since the last computed step.",
        paper="Liu et al. 2024, Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model "
              "(arXiv 2411.19108)",
        lossless=False,
        config=TeaCacheConfig,
        slots=("dit-cache",),
    )

    def attach(self, backend, plan: DiffusionPlan) -> RunHandle:
        denoiser = backend.denoiser
        if not block_lists(denoiser):
            raise ValidationError(f"teacache found no transformer block list in {type(denoiser).__name__}")
        choice, coefficients, fitted = self.pick_rescale(backend, plan)
        # the last step (always computed) needs the plan's step count
        config = replace(self.config, coefficients=coefficients, num_steps=plan.steps)
        cache = apply_teacache(denoiser, config, pipe=backend.pipe)
        own = {"rescale": choice}
        if fitted is not None:
            own["calibration_id"] = fitted.get("id")
            own["calibration_settings"] = "same" if fitted.get("settings") == plan_settings(backend, plan) else "other"
        return span_handle(plan, cache, lambda: dict(own), self.notes)

    def pick_rescale(self, backend, plan: DiffusionPlan) -> tuple[str, tuple[float, ...], dict | None]:
        """(what was used, its coefficients, the calibration record or None). ``auto``
        prefers this model's own fit (for these settings, else the newest one) over the
        FLUX fit; a request or preset can still force ``flux`` or ``none``."""
        choice = self.config.rescale
        fitted = None
        if choice in ("auto", "calibrated"):
            fitted = matching_calibration(self.calibrations, RESCALE, plan_settings(backend, plan), exact=False)
            if fitted is not None:
                return "calibrated", tuple(float(c) for c in fitted["coefficients"]), fitted
            if choice == "calibrated":
                raise ValidationError("teacache rescale=calibrated: this model has no stored calibration; "
                                      "fit one in the Calibrate tab, or use rescale=auto")
            choice = "flux" if type(backend.denoiser).__name__.startswith("Flux") else "none"
        return choice, (FLUX_COEFFICIENTS if choice == "flux" else ()), None

    def notes(self, plan: DiffusionPlan) -> list[str]:
        if self.config.threshold <= 0:
            return ["teacache with threshold 0 recomputes every step: no speed-up"]
        if plan.steps <= 2:
            return ["teacache always computes the first and last step: with 2 steps or fewer it skips nothing"]
        return []
