"""RALU, region-adaptive latent upsampling (Jeong et al. 2025, seed 455: 7.0x FLUX, 3.0x SD3).

Three stages, each with its own steps, sigma range and time shift:

1. the whole latent at half size per side (a quarter of the tokens): global layout;
2. the regions most prone to upsampling artifacts (edges) at full size, the rest still at
   half size: the denoiser sees the kept low-resolution tokens and the upsampled regions'
   full-resolution tokens in one sequence, the latter at half-integer positions of the
   low-resolution grid (their place between the coarse tokens);
3. everything at full size, for detail.

The edges are found on the clean estimate at the end of stage 1, decoded by the VAE: the
gradient magnitude of its grey image (a Sobel filter here; the paper runs Canny, which
needs OpenCV), summed per low-resolution token; the top ``up_ratio`` of the tokens go up
first.

Noise-timestep rescheduling at each upsampling: nearest upsampling copies the noise too,
so it is no longer white. The latent is scaled by beta and noise alpha n' is added, n'
correlated within each upsampled block (covariance I - J / Z^2) so that the sum's noise is
white again; the noise-to-signal ratio grows by Z and the next stage starts at that sigma
(in the paper's time terms s = e / (Z (1 - e) + e), alpha = 1 - s, beta = s / e).

The paper's setting (FLUX.1-dev, 1024 px, against 50 steps): 4x: steps (5, 6, 7), stage
ends e = (0.3, 0.45), shifts (5.019, 2.589, 2.226), Z = 6.317, up_ratio 0.3; 7x: steps (2,
3, 5), e = (0.2, 0.3), shifts (8.141, 2.856, 2.193), Z = 6.261, up_ratio 0.1. The step count
is RALU's own (the run's is replaced by the sum of the stages'). The mixed stage needs
explicit token positions: FLUX-layout transformers only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from backends.accel._multires import (FluxLayout, MultiResRun, Stage, block_correlated_noise, check_steps,
                                      down_nearest, flow_x0, layout_for, lift_noise, solver_note, stage_sigmas,
                                      up_nearest)
from backends.accel.base import Limits, Method, MethodConfig, MethodSpec, param, register
from backends.plan import DiffusionPlan, RunHandle, require_from_noise
from backends.types import ValidationError

FACTOR = 2  # the paper's f0: each side halves in stages 1 and 2


class RALUConfig(MethodConfig):
    steps_low: int = param(5, min=1, max=50, help="stage 1 steps (whole latent at half size)")
    steps_mixed: int = param(6, min=1, max=50, help="stage 2 steps (edge regions at full size)")
    steps_full: int = param(7, min=1, max=50, help="stage 3 steps (everything at full size)")
    end_low: float = param(0.3, min=0.05, max=0.9, step=0.05,
                           help="flow time (1 - sigma) at which stage 1 ends")
    end_mixed: float = param(0.45, min=0.1, max=0.95, step=0.05,
                             help="flow time (1 - sigma) at which stage 2 ends")
    shift_low: float = param(5.019, min=0.1, max=20.0, step=0.1, help="time shift of stage 1's steps")
    shift_mixed: float = param(2.589, min=0.1, max=20.0, step=0.1, help="time shift of stage 2's steps")
    shift_full: float = param(2.226, min=0.1, max=20.0, step=0.1, help="time shift of stage 3's steps")
    z: float = param(6.317, min=2.0, max=20.0, step=0.1,
                     help="noise rescheduling constant Z: at each upsampling the noise-to-signal ratio grows by Z")
    positions: str = param("grid", choices=("grid", "scaled"),
                           help="token positions of the smaller grid: its own (grid, the paper's) or the full "
                                "grid's coordinates (scaled; FLUX layout only, for models trained at one size)")
    up_ratio: float = param(0.3, min=0.0, max=1.0, step=0.05,
                            help="fraction of the low-resolution tokens (the edgiest) upsampled in stage 2")


def ralu_stages(config: RALUConfig) -> list[Stage]:
    """The three stages' sigma grids; each later stage starts at the rescheduled sigma."""
    if config.end_mixed <= config.end_low:
        raise ValidationError("ralu: end_mixed must be after end_low")
    ends = (1 - config.end_low, 1 - config.end_mixed, 0.0)
    starts = (1.0, lift_noise(ends[0], config.z), lift_noise(ends[1], config.z))
    steps = (config.steps_low, config.steps_mixed, config.steps_full)
    shifts = (config.shift_low, config.shift_mixed, config.shift_full)
    stages = [Stage(f, stage_sigmas(a, b, n, s)) for f, a, b, n, s in zip((FACTOR, FACTOR, 1), starts, ends, steps,
                                                                          shifts)]
    check_steps(stages, "ralu")
    return stages


def edge_strength(backend, x0_low: torch.Tensor) -> torch.Tensor:
    """Per low-resolution token, the summed gradient magnitude of the decoded clean estimate."""
    pipe = backend.pipe
    vae = pipe.vae
    latents = x0_low / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    with torch.no_grad():
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0].float()
    grey = (0.299 * image[:, 0] + 0.587 * image[:, 1] + 0.114 * image[:, 2]).unsqueeze(1)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=grey.device)
    gx = F.conv2d(grey, sobel.view(1, 1, 3, 3), padding=1)
    gy = F.conv2d(grey, sobel.t().reshape(1, 1, 3, 3), padding=1)
    magnitude = (gx.square() + gy.square()).sqrt().sum(0, keepdim=True)  # over the batch
    rows, cols = x0_low.shape[-2] // 2, x0_low.shape[-1] // 2  # a token is 2x2 latent pixels
    return F.adaptive_avg_pool2d(magnitude, (rows, cols))[0, 0]


def top_regions(strength: torch.Tensor, ratio: float) -> torch.Tensor:
    """The top ``ratio`` of the tokens by edge strength, as a bool mask (ties by position)."""
    count = int(strength.numel() * ratio)
    mask = torch.zeros(strength.numel(), dtype=torch.bool)
    if count > 0:
        mask[torch.topk(strength.flatten().cpu(), count).indices] = True
    return mask.view(strength.shape)


def ralu_transition(config: RALUConfig):
    def transition(run: MultiResRun, x: torch.Tensor, v: torch.Tensor, k: int) -> torch.Tensor:
        layout: FluxLayout = run.layout  # type: ignore[assignment]
        done, nxt = run.stages[k], run.stages[k + 1]
        sigma_end, sigma_next = done.sigmas[-1], nxt.sigmas[0]
        alpha, beta = sigma_next, (1 - sigma_next) / (1 - sigma_end)
        grid = layout.to_grid(x)
        low = down_nearest(grid, FACTOR)
        up = up_nearest(low, FACTOR)
        correlated = beta * up + alpha * block_correlated_noise(tuple(up.shape), FACTOR, config.z, run.generator,
                                                                up.device)
        if k == 0:  # whole latent -> edge regions at full size, the rest re-noised at half size
            x0 = flow_x0(low, down_nearest(layout.to_grid(v), FACTOR), sigma_end)
            region = top_regions(edge_strength(run.backend, x0), config.up_ratio)
            nxt.region = region
            kept = up_nearest(beta * low + alpha * run.noise(tuple(low.shape), low.device), FACTOR)
            mask = pixel_mask(region, FACTOR, grid)
            return layout.from_grid(torch.where(mask, correlated, kept).contiguous())
        # mixed -> full: the low tokens up with correlated noise, the full regions with white noise
        mask = pixel_mask(done.region, FACTOR, grid)
        full = beta * grid + alpha * run.noise(tuple(grid.shape), grid.device)
        return layout.from_grid(torch.where(mask, full, correlated).contiguous())

    return transition


def pixel_mask(region: torch.Tensor | None, factor: int, grid: torch.Tensor) -> torch.Tensor:
    """The region mask (low-resolution tokens) on the full latent grid: a token is 2x2 latent
    pixels at half size, so 2 factor x 2 factor at full size."""
    if region is None:
        return torch.zeros(grid.shape[-2:], dtype=torch.bool, device=grid.device)
    side = 2 * factor
    return region.repeat_interleave(side, 0).repeat_interleave(side, 1).to(grid.device)


@register
class RALUMethod(Method):
    spec = MethodSpec(
        name="ralu",
        title="RALU (region-adaptive latent upsampling)",
        modalities=("image",),
        families=("dit",),
        summary="Denoise at half size first, then bring the edge regions to full size, then everything; "
                "re-noise with correlated noise at each upsampling so the noise stays white.",
        paper="Jeong et al. 2025, Upsample What Matters: Region-Adaptive Latent Sampling for Accelerated "
              "Diffusion Transformers (seed 455: 7.0x FLUX, 3.0x SD3)",
        lossless=False,
        config=RALUConfig,
        slots=("resolution", "dit-cache"),  # block caches keep token-count-shaped state across steps
    )
    attach_first = False

    @classmethod
    def limits(cls, backend) -> Limits:
        """The mixed stage ends after the low one: end_mixed > end_low (any model)."""
        return Limits(ranges={"end_mixed": (("end_low", 0.05), None)})

    def attach(self, backend, plan: DiffusionPlan) -> RunHandle:
        config = self.config
        require_from_noise(plan, "ralu", "its stages are fractions of the whole schedule")
        layout = layout_for(backend, plan, FACTOR, "ralu", config.positions)
        if not isinstance(layout, FluxLayout):
            raise ValidationError("ralu needs a FLUX-layout transformer (explicit token positions for the mixed "
                                  "stage); use bottleneck_sampling for video")
        if getattr(backend.pipe, "vae", None) is None:
            raise ValidationError("ralu finds edges on the VAE-decoded estimate; this model has no VAE")
        stages = ralu_stages(config)
        plan.steps = sum(s.steps for s in stages)  # RALU's own step budget replaces the run's
        run = MultiResRun(backend, layout, lambda _base: ralu_stages(config), ralu_transition(config),
                          plan.kwargs.get("generator"))
        notes = solver_note(backend, "ralu")
        handle = RunHandle(plan, lambda: {**run.stats(), "upsampled_early": upsampled(run)},
                           lambda p: notes + self.notes(p))
        with handle.undo_on_error():
            run.attach(handle)
        return handle

    def notes(self, plan: DiffusionPlan) -> list[str]:
        return [f"ralu runs its own {plan.steps} steps (stages of {self.config.steps_low}, "
                f"{self.config.steps_mixed} and {self.config.steps_full}), whatever the step count asked"]


def upsampled(run: MultiResRun) -> int | None:
    """How many low-resolution tokens stage 2 took to full size."""
    if len(run.stages) < 2 or run.stages[1].region is None:
        return None
    return int(run.stages[1].region.sum())
