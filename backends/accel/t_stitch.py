"""T-Stitch (Pan et al. 2024, "T-Stitch: Accelerating Sampling in Pre-trained Diffusion
Models with Trajectory Stitching"; seed 202): a smaller model of the same latent space
runs the early denoising steps, the full model the late ones.

Early steps only settle the coarse layout, which a small model gets about as right as a
large one; the fine detail of the late steps is where the large model's capacity pays.
The paper hands the first 40% of DiT-XL's steps to DiT-S (10x cheaper) at no FID loss, and
reports 1.2-1.5x over the whole trajectory.

Mechanics: the full denoiser's ``forward`` is shadowed (``ForwardPatch``); while fewer
than ``fraction * steps`` steps have finished it calls the sibling's denoiser with the very
same arguments (latents, timestep, prompt embeddings from the full model's text encoder),
then the full model's own forward. That is only sound when the two models share the latent
space (same VAE), the prompt encoding (same text encoders and tokenizers) and the noise
schedule (same scheduler family, betas and prediction type): ``check_stitchable`` refuses
any other pair in one line. The bundled ``tiny-sd-shapes-small`` is trained that way
(``python -m backends.tiny.train shapes-unet --size small``: half the channels, the full
model's text encoder frozen).

The sibling is loaded once by the backend through the same ``from_pretrained`` path as
the model itself (``DiffusionBackend.get_sibling``) and kept there. The cost meter files the
sibling's calls as partial evaluations, so the run's ideal speedup follows from the
measured cost of a small call against a full one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from backends.accel._eval_cost import EvalCostMeter
from backends.accel._patch import ForwardPatch, StepCallback
from backends.accel.base import Limits, Method, MethodConfig, MethodSpec, param, register
from backends.catalog import bundled
from backends.plan import DiffusionPlan, RunHandle
from backends.types import ValidationError

TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
# denoiser config keys that decide which inputs a call carries and what it returns
INTERFACE_KEYS = ("in_channels", "out_channels", "sample_size", "patch_size", "cross_attention_dim",
                  "joint_attention_dim", "pooled_projection_dim", "addition_embed_type", "encoder_hid_dim",
                  "encoder_hid_dim_type", "projection_class_embeddings_input_dim", "guidance_embeds",
                  "time_cond_proj_dim", "class_embed_type")
SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas",
                 "prediction_type", "shift", "use_dynamic_shifting")
VAE_KEYS = ("latent_channels", "scaling_factor", "shift_factor", "block_out_channels")


class TStitchConfig(MethodConfig):
    small_model: str = param("auto", choices=("auto", *(m.name for m in bundled("image", available_only=False))),
                             help="the smaller model that runs the early steps; 'auto' = the model's bundled "
                                  "sibling (tiny-sd-shapes: tiny-sd-shapes-small)")
    fraction: float = param(0.4, min=0.0, max=1.0, step=0.05,
                            help="share of the steps, from the first, run by the small model (paper: 40% of "
                                 "DiT-XL's steps by DiT-S at no FID loss)")


@dataclass
class StitchState:
    small_calls: int = 0
    full_calls: int = 0


def _denoiser(pipe: Any) -> torch.nn.Module | None:
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)


def _same_weights(a: torch.nn.Module | None, b: torch.nn.Module | None) -> bool:
    if a is b:
        return True
    if a is None or b is None:
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k].to(sb[k].device, sb[k].dtype), sb[k]) for k in sa)


def _config_of(obj: Any) -> dict[str, Any]:
    return dict(getattr(obj, "config", {}) or {})


def _differs(a: Any, b: Any, keys: tuple[str, ...]) -> str | None:
    """The first of ``keys`` whose config values differ (missing counts as None)."""
    ca, cb = _config_of(a), _config_of(b)
    for key in keys:
        va, vb = ca.get(key), cb.get(key)
        if (list(va) if isinstance(va, (list, tuple)) else va) != (list(vb) if isinstance(vb, (list, tuple)) else vb):
            return key
    return None


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def stitch_mismatch(full: Any, small: Any) -> str | None:
    """Why ``small`` cannot run ``full``'s early steps (a phrase), or None when it can."""
    full_net, small_net = _denoiser(full), _denoiser(small)
    kinds = ["UNet" if getattr(p, "unet", None) is not None else "transformer" for p in (full, small)]
    if small_net is None or kinds[0] != kinds[1]:
        return f"it has no {kinds[0]} denoiser"
    key = _differs(full_net, small_net, INTERFACE_KEYS)
    if key:
        return f"its denoiser's {key} differs"
    if _params(small_net) >= _params(full_net):
        return "it is not smaller than the model"
    vae_full, vae_small = getattr(full, "vae", None), getattr(small, "vae", None)
    if _differs(vae_full, vae_small, VAE_KEYS) or not _same_weights(vae_full, vae_small):
        return "its VAE differs (another latent space)"
    for name in TEXT_PARTS:
        if not _same_weights(getattr(full, name, None), getattr(small, name, None)):
            return f"its {name.replace('_', ' ')} differs (another prompt encoding)"
    for name in TOKENIZERS:
        ta, tb = getattr(full, name, None), getattr(small, name, None)
        if (ta is None) != (tb is None) or ta is not None and ta is not tb and ta.get_vocab() != tb.get_vocab():
            return f"its {name} differs"
    if type(full.scheduler).__name__ != type(small.scheduler).__name__ or \
            _differs(full.scheduler, small.scheduler, SCHEDULE_KEYS):
        return "its noise schedule differs"
    return None


def check_stitchable(full: Any, small: Any, model_id: str, small_id: str) -> None:
    reason = stitch_mismatch(full, small)
    if reason:
        raise ValidationError(f"T-Stitch cannot run '{small_id}' for the early steps of '{model_id}': {reason}; "
                              "the small model must share the latent space, prompt encoding and noise schedule")


@register
class TStitchMethod(Method):
    spec = MethodSpec(
        name="t_stitch",
        title="T-Stitch (small model for the early steps)",
        modalities=("image",),
        families=("unet", "dit"),
        summary="A smaller sibling of the model (same latents, prompt encoding and schedule) runs the first "
                "steps, which only settle the layout; the full model runs the rest.",
        paper="Pan et al. 2024, T-Stitch: Accelerating Sampling in Pre-trained Diffusion Models with Trajectory "
              "Stitching (seed 202: 40% of DiT-XL's steps by DiT-S at no FID loss, 1.2-1.5x)",
        lossless=False,
        config=TStitchConfig,
    )

    @classmethod
    def limits(cls, backend) -> Limits:
        """small_model='auto' means the model's paired sibling: with none, the search leaves
        the method out (small_model is not searched); the attach refuses it with the reason."""
        if getattr(backend, "sibling_id", None):
            return Limits()
        choices = tuple(c for c in cls.spec.param("small_model").choices if c != "auto")
        return Limits(search_choices={"small_model": choices})

    def small_id(self, backend) -> str:
        if self.config.small_model != "auto":
            return self.config.small_model
        sibling = getattr(backend, "sibling_id", None)
        if not sibling:
            raise ValidationError(f"model '{backend.model_id}' has no smaller sibling for T-Stitch; choose one in "
                                  "the method's 'small_model' setting")
        return sibling

    def attach(self, backend, plan: DiffusionPlan) -> RunHandle:
        small_id = self.small_id(backend)
        if small_id == backend.model_id:
            raise ValidationError(f"T-Stitch needs a smaller model than '{backend.model_id}' itself")
        if getattr(plan, "img2img", None):
            raise ValidationError("T-Stitch does not run img2img: its switch step counts the whole schedule, not "
                                  "the img2img steps; remove the init image or the method")
        small = backend.get_sibling(small_id)
        # the weight comparison runs once per (model, sibling), not once per run: kept on the
        # loaded model itself (reloaded, it is checked again), never keyed by object ids,
        # which a later model can reuse
        checked = vars(backend).setdefault("t_stitch_checked", set())
        if small_id not in checked:
            check_stitchable(backend.pipe, small, backend.model_id, small_id)
            checked.add(small_id)
        return apply_t_stitch(backend.denoiser, _denoiser(small), plan, self.config.fraction, small_id,
                              self.notes)

    def notes(self, plan: DiffusionPlan) -> list[str]:
        small_steps = small_step_count(self.config.fraction, plan.steps)
        if small_steps == 0:
            return [f"T-Stitch with fraction {self.config.fraction} hands none of the {plan.steps} steps to the "
                    "small model: no speed-up"]
        if small_steps == plan.steps:
            return ["T-Stitch with fraction 1 runs every step on the small model: the full model never runs"]
        return []


def small_step_count(fraction: float, steps: int) -> int:
    return min(steps, max(0, round(fraction * steps)))


def apply_t_stitch(full: torch.nn.Module, small: torch.nn.Module, plan: DiffusionPlan, fraction: float,
                   small_id: str = "", notes=None) -> RunHandle:
    """Route the full denoiser's calls to ``small`` during the first ``fraction`` of
    ``plan.steps``; the returned handle's ``remove()`` restores ``full.forward``."""
    switch = small_step_count(fraction, plan.steps)
    state, counter = StitchState(), StepCallback()
    plan.callbacks.append(counter)

    def make_forward(original):
        def forward(*args, **kwargs):
            if counter.step < switch:
                state.small_calls += 1
                costs.mark_partial()
                return small(*args, **kwargs)
            state.full_calls += 1
            return original(*args, **kwargs)

        return forward

    costs = EvalCostMeter(full)  # a small call is a partial evaluation: the ideal follows from the two costs

    def stats() -> dict[str, Any]:
        return {"small_model": small_id, "switch_step": switch, "small_calls": state.small_calls,
                "full_calls": state.full_calls, **costs.stats()}

    handle = RunHandle(plan, stats, notes)
    handle.on_remove(costs.remove)
    with handle.undo_on_error():
        handle.on_remove(ForwardPatch(full, make_forward).remove)
    return handle
