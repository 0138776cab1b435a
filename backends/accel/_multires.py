"""Resolution changes inside one denoising run, shared by ``bottleneck_sampling`` and ``ralu``.

Both methods run some steps of a flow-matching model on a smaller latent (fewer tokens per
denoiser call) and re-noise the latent where the resolution changes. They do it inside
the diffusers pipeline's own loop, without rewriting it, through three reversible patches:

* ``scheduler.set_timesteps``: after the pipeline's call the scheduler holds the
  method's schedule instead: one sigma per step at which the denoiser is evaluated
  (stage by stage, each stage with its own shift; a re-noised stage starts higher than
  the previous one ended). ``timesteps`` and ``sigmas`` are what pipelines read.
* the denoiser's forward (a pre-hook and a hook): a call of a low-resolution stage gets
  the stage's latent, taken from the pipeline's full-size latent by a strided slice, with
  the positions of the smaller grid (FLUX ``img_ids``; Wan derives them from the shape),
  and its output is returned nearest-upsampled. RALU's mixed stage passes the kept
  low-resolution tokens and the upsampled regions' full-resolution tokens together.
* ``scheduler.step``: one Euler step of the flow ODE, x + (sigma_next - sigma) v.

Why this is exact: every operation the pipeline applies to its latent between two denoiser
calls (the CFG combination, the x-prediction conversion, the Euler step) is elementwise, so
the strided slice of the pipeline's full-size latent *is* the low-resolution latent the
stage evolves: the other entries are carried along and never read. At a stage change the
patched ``step`` replaces the latent with the next stage's (``Transition``): resized and
re-noised to the next stage's first sigma.

Only flow-matching schedulers (x_t = (1 - sigma) x0 + sigma noise) are handled: the
re-noising formulas are written in those terms. Layouts: FLUX (packed 2x2 latent patches,
``img_ids`` positions) and Wan-style video transformers (B, C, F, H, W; spatial only).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from backends.accel._patch import patch_attr
from backends.accel._eval_cost import EvalCostMeter
from backends.accel.sampler import is_flow_matching
from backends.types import ValidationError


# ----------------------------------------------------------------------------- grids


def down_nearest(grid: torch.Tensor, factor: int) -> torch.Tensor:
    """The low-resolution latent inside a full-size one (exact inverse of ``up_nearest``)."""
    return grid[..., ::factor, ::factor] if factor > 1 else grid


def up_nearest(grid: torch.Tensor, factor: int) -> torch.Tensor:
    return grid.repeat_interleave(factor, -2).repeat_interleave(factor, -1) if factor > 1 else grid


def down_area(grid: torch.Tensor, factor: int) -> torch.Tensor:
    """Average over factor x factor blocks (the last two dimensions)."""
    if factor == 1:
        return grid
    *lead, h, w = grid.shape
    return grid.reshape(*lead, h // factor, factor, w // factor, factor).mean((-3, -1))


def up_smooth(grid: torch.Tensor, factor: int) -> torch.Tensor:
    """Bilinear upsampling of the last two dimensions (for a clean estimate, not noise)."""
    if factor == 1:
        return grid
    *lead, h, w = grid.shape
    flat = grid.reshape(-1, 1, h, w)
    out = F.interpolate(flat, scale_factor=factor, mode="bilinear", align_corners=False)
    return out.reshape(*lead, h * factor, w * factor)


def block_correlated_noise(shape: tuple[int, ...], factor: int, z: float, generator: torch.Generator | None,
                           device: torch.device) -> torch.Tensor:
    """Noise whose factor x factor blocks (last two dims) have covariance I - J / z^2 (J all
    ones): added to a nearest-upsampled noise scaled by 1 / z (covariance J / z^2 per
    block), the sum is white (RALU's correlated noise). Built as w - k * blockmean(w) with
    k = 1 - sqrt(1 - n / z^2), n = factor^2 entries per block; needs z^2 >= n."""
    n = factor * factor
    if z * z < n:
        raise ValidationError(f"the re-noising constant must be at least {math.sqrt(n):.1f} for {factor}x upsampling")
    white = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    k = 1.0 - math.sqrt(1.0 - n / (z * z))
    return white - k * up_nearest(down_area(white, factor), factor)


class Layout:
    """How the pipeline's latent maps to a (B, C, [F], H, W) grid and how a denoiser call
    on a smaller grid is made."""

    input_key = "hidden_states"

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        return grid

    def low_call(self, kwargs: dict[str, Any], factor: int) -> None:
        """Adjust the call's other inputs (positions) to the smaller grid."""

    def check(self, height: int, width: int, factor: int) -> None:
        """Refuse a grid the factor does not divide."""

    def attach(self, run: "MultiResRun", handle: Any) -> None:
        """Hooks the layout needs inside the denoiser (none by default)."""


class WanLayout(Layout):
    """(B, C, F, H, W) latents; the transformer's RoPE follows the input's shape: a smaller
    grid gets positions 0, 1, 2... of its own. ``scaled_positions``: a low call's rotary
    table is the full grid's, taken at every ``factor``-th row and column (the positions of
    the tokens the strided slice keeps), through a hook on the transformer's ``rope``."""

    def __init__(self, patch: tuple[int, int, int], scaled_positions: bool = False):
        self.patch = patch
        self.scaled = scaled_positions

    def attach(self, run: "MultiResRun", handle: Any) -> None:
        rope = getattr(run.backend.denoiser, "rope", None)
        if not self.scaled:
            return
        if rope is None:
            raise ValidationError("scaled positions need the transformer's rotary embedding module (rope)")

        def full_grid_positions(module: Any, args: tuple, output: Any) -> Any:
            factor = run.call_factor
            if factor == 1:
                return None
            (hidden,) = args[:1]
            b, c, f, h, w = hidden.shape
            full = type(module).forward(module, hidden.new_empty(b, c, f, h * factor, w * factor))
            p_t, p_h, p_w = self.patch
            grid = (f // p_t, h * factor // p_h, w * factor // p_w)
            return tuple(t.reshape(*grid, -1)[:, ::factor, ::factor].reshape(1, -1, 1, t.shape[-1]) for t in full)

        hook = rope.register_forward_hook(full_grid_positions)
        handle.on_remove(hook.remove)

    def check(self, height: int, width: int, factor: int) -> None:
        if height % (factor * self.patch[1]) or width % (factor * self.patch[2]):
            raise ValidationError(f"this size does not divide into {factor}x smaller patches of the transformer")


class FluxLayout(Layout):
    """Packed FLUX latents: (B, (h/2)(w/2), 4C) tokens of 2x2 latent patches, positions in
    ``img_ids`` (row, column of the token grid).

    ``scaled_positions``: a smaller grid's tokens get the full grid's coordinates (each at
    the centre of the block it covers: position interpolation) instead of the smaller
    grid's own 0, 1, 2... (the papers' choice, right for a model that was also trained at
    the smaller size; a model trained at one size only reads positions as absolute places)."""

    def __init__(self, latent_h: int, latent_w: int, scaled_positions: bool = False):
        self.h, self.w = latent_h, latent_w
        self.scaled = scaled_positions

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Unpack tokens of the full grid or of one ``factor`` times smaller (told apart by count)."""
        factor = max(1, round(math.sqrt(self.h * self.w / 4 / x.shape[1])))
        return self.grid_of(x, factor)

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        b, c, h, w = grid.shape
        return grid.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    def grid_of(self, x: torch.Tensor, factor: int) -> torch.Tensor:
        """A packed latent of the grid ``factor`` times smaller, unpacked."""
        b, n, d = x.shape
        h, w = self.h // factor, self.w // factor
        return x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)

    def ids(self, factor: int, like: torch.Tensor) -> torch.Tensor:
        rows, cols = self.h // (2 * factor), self.w // (2 * factor)
        ids = token_ids(rows, cols, like)
        if self.scaled and factor > 1:
            ids[:, 1:] = ids[:, 1:] * factor + (factor - 1) / 2
        return ids

    def low_call(self, kwargs: dict[str, Any], factor: int) -> None:
        kwargs["img_ids"] = self.ids(factor, kwargs["img_ids"])

    def check(self, height: int, width: int, factor: int) -> None:
        if self.h % (2 * factor) or self.w % (2 * factor):
            raise ValidationError(f"this size does not divide into a {factor}x smaller token grid")


def token_ids(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """FLUX image positions (0, row, col) of a rows x cols token grid."""
    r = torch.arange(rows, device=like.device, dtype=like.dtype)
    c = torch.arange(cols, device=like.device, dtype=like.dtype)
    grid = torch.stack(torch.meshgrid(r, c, indexing="ij"), -1).reshape(-1, 2)
    return torch.cat([torch.zeros(len(grid), 1, device=like.device, dtype=like.dtype), grid], 1)


def layout_for(backend: Any, plan: Any, factor: int, method: str, positions: str = "grid") -> Layout:
    """The layout of ``backend``'s denoiser, or a one-line refusal. ``positions``: "grid"
    (the smaller grid's own) or "scaled" (the full grid's coordinates; FLUX layout only)."""
    denoiser = backend.denoiser
    scheduler = backend.pipe.scheduler
    if not is_flow_matching(scheduler):
        raise ValidationError(f"{method} needs a flow-matching model; this model samples with "
                              f"{type(scheduler).__name__}")
    name = type(denoiser).__name__
    if "Flux" in name:
        scale = getattr(backend.pipe, "vae_scale_factor", 8)
        height, width = int(plan.kwargs.get("height", 0)), int(plan.kwargs.get("width", 0))
        latent_h, latent_w = 2 * (height // (scale * 2)), 2 * (width // (scale * 2))
        layout: Layout = FluxLayout(latent_h, latent_w, scaled_positions=positions == "scaled")
        layout.check(height, width, factor)
        return layout
    patch = getattr(getattr(denoiser, "config", None), "patch_size", None)
    if backend.modality == "video" and isinstance(patch, (tuple, list)) and len(patch) == 3:
        layout = WanLayout(tuple(patch), scaled_positions=positions == "scaled")
        pipe = backend.pipe
        scale = getattr(pipe, "vae_scale_factor_spatial", getattr(pipe, "vae_scale_factor", 1))
        size = getattr(getattr(pipe, "config", None), "default_size", None)
        height = int(plan.kwargs.get("height") or size or 0)
        width = int(plan.kwargs.get("width") or size or 0)
        if height and width:
            layout.check(height // scale, width // scale, factor)
        return layout
    raise ValidationError(f"{method} needs a FLUX-layout or Wan-layout transformer; this model's denoiser is {name}")


# ----------------------------------------------------------------------------- schedules


def shift_sigma(u: torch.Tensor | float, shift: float):
    """The flow-matching time shift sigma = s u / (1 + (s - 1) u)."""
    return shift * u / (1 + (shift - 1) * u)


def unshift_sigma(sigma: float, shift: float) -> float:
    return sigma / (shift - (shift - 1) * sigma)


def stage_sigmas(start: float, end: float, steps: int, shift: float) -> list[float]:
    """``steps + 1`` sigmas from ``start`` to ``end``, uniform in the unshifted time of
    ``shift`` (a larger shift spends more of the stage's steps at high noise)."""
    u = torch.linspace(unshift_sigma(start, shift), unshift_sigma(end, shift), steps + 1, dtype=torch.float64)
    return [float(s) for s in shift_sigma(u, shift)]


def lift_noise(sigma: float, ratio: float) -> float:
    """The sigma whose noise-to-signal ratio sigma / (1 - sigma) is ``ratio`` times that of
    ``sigma`` (RALU's rescheduling: s' = e / (Z (1 - e) + e) in its time terms)."""
    if sigma >= 1:
        return 1.0
    nsr = ratio * sigma / (1 - sigma)
    return nsr / (1 + nsr)


@dataclass
class Stage:
    """``factor``: how many times smaller each spatial side is (1 = full resolution).
    ``sigmas``: ``steps + 1`` values, the stage's evaluation sigmas then the one it ends at.
    ``region``: RALU's mixed stage, a bool mask over the low-resolution token grid of the
    regions already at full resolution."""

    factor: int
    sigmas: list[float]
    region: torch.Tensor | None = None

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1


# ----------------------------------------------------------------------------- the run


Transition = Callable[["MultiResRun", torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class Counts:
    full_calls: int = 0
    low_calls: int = 0
    mixed_calls: int = 0
    tokens: int = 0
    tokens_full: int = 0
    stage_steps: list[int] = field(default_factory=list)


class MultiResRun:
    """One run's stages, patches and figures. ``build_stages(base_sigmas)`` makes the stages
    from the schedule the model's scheduler set for the pipeline's call (its ``steps + 1``
    sigmas, ending at 0), when the pipeline sets it. ``transition(run, x, v, k)`` returns
    the pipeline latent for stage ``k + 1`` from the latent ``x`` that ends stage ``k``
    (after its last Euler step) and the model output ``v`` of that step."""

    def __init__(self, backend: Any, layout: Layout, build_stages: Callable[[list[float]], list[Stage]],
                 transition: Transition, generator: torch.Generator | None):
        self.backend, self.layout, self.build_stages, self.transition = backend, layout, build_stages, transition
        self.generator = generator
        self.step_index = 0
        self.stages: list[Stage] = []
        self.ends: list[int] = []
        self.counts = Counts()
        self._pending: list[dict[str, Any]] = []
        self.meter: EvalCostMeter | None = None
        self.call_factor = 1  # the size factor of the denoiser call in progress

    def set_stages(self, stages: list[Stage]) -> None:
        self.stages = stages
        self.ends = list(itertools.accumulate(s.steps for s in stages))
        self.counts.stage_steps = [s.steps for s in stages]
        self.step_index = 0

    def noise(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Fresh noise from the run's seeded generator (drawn on the CPU: one seed, one image)."""
        return torch.randn(shape, generator=self.generator, dtype=torch.float32).to(device)

    @property
    def total_steps(self) -> int:
        return self.ends[-1]

    def stage_at(self, step: int) -> int:
        for k, end in enumerate(self.ends):
            if step < end:
                return k
        return len(self.stages) - 1

    def sigma_pair(self, step: int) -> tuple[float, float]:
        k = self.stage_at(step)
        local = step - (self.ends[k] - self.stages[k].steps)
        sig = self.stages[k].sigmas
        return sig[local], sig[local + 1]

    def eval_sigmas(self) -> list[float]:
        return [self.sigma_pair(i)[0] for i in range(self.total_steps)]

    # -- the patches
    def attach(self, handle: Any) -> None:
        scheduler, denoiser = self.backend.pipe.scheduler, self.backend.denoiser
        self.meter = EvalCostMeter(denoiser)  # registered first: its pre-hook resets before ours marks
        handle.on_remove(self.meter.remove)
        original_set, original_step = scheduler.set_timesteps, scheduler.step

        @functools.wraps(original_set)  # pipelines inspect its signature (custom sigmas, mu)
        def set_timesteps(*args: Any, **kwargs: Any) -> Any:
            out = original_set(*args, **kwargs)
            self.set_stages(self.build_stages([float(v) for v in scheduler.sigmas]))
            device = scheduler.timesteps.device
            sigmas = torch.tensor(self.eval_sigmas(), dtype=torch.float32, device=device)
            scheduler.timesteps = sigmas * scheduler.config.num_train_timesteps
            scheduler.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
            scheduler.num_inference_steps = self.total_steps
            return out

        @functools.wraps(original_step)
        def step(model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any,
                 return_dict: bool = True, **kwargs: Any) -> Any:
            return self._step(model_output, sample, return_dict)

        # earlier patches (another method's) are put back on removal, not deleted
        patch_attr(handle, scheduler, "set_timesteps", set_timesteps)
        patch_attr(handle, scheduler, "step", step)
        pre = denoiser.register_forward_pre_hook(self._before_call, with_kwargs=True)
        post = denoiser.register_forward_hook(self._after_call, with_kwargs=True)
        handle.on_remove(post.remove)
        handle.on_remove(pre.remove)
        self.layout.attach(self, handle)

    def _step(self, v: torch.Tensor, sample: torch.Tensor, return_dict: bool) -> Any:
        i = self.step_index
        sigma, sigma_next = self.sigma_pair(i)
        x = sample.float() + (sigma_next - sigma) * v.float()
        k = self.stage_at(i)
        if i == self.ends[k] - 1 and k + 1 < len(self.stages):
            x = self.transition(self, x, v.float(), k)
        self.step_index += 1
        x = x.to(sample.dtype)
        if not return_dict:
            return (x,)
        from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=x)

    def _before_call(self, _module: Any, args: tuple, kwargs: dict[str, Any]):
        stage = self.stages[self.stage_at(self.step_index)]
        key = self.layout.input_key
        x = kwargs.get(key)
        if x is None:
            raise ValidationError("resolution change needs the denoiser's latent passed by keyword")
        full_tokens = self._tokens(x)
        if stage.factor == 1:
            self.counts.full_calls += 1
            self.counts.tokens += full_tokens
            self.counts.tokens_full += full_tokens
            self._pending.append({"kind": "full"})
            return None
        kwargs = dict(kwargs)
        if stage.region is not None and bool(stage.region.any()):
            info = self._mixed_inputs(x, stage, kwargs)
            self.counts.mixed_calls += 1
        else:
            grid = down_nearest(self.layout.to_grid(x), stage.factor)
            kwargs[key] = self.layout.from_grid(grid.contiguous())
            self.layout.low_call(kwargs, stage.factor)
            info = {"kind": "low", "factor": stage.factor}
            self.call_factor = stage.factor
            self.counts.low_calls += 1
        self.counts.tokens += self._tokens(kwargs[key])
        self.counts.tokens_full += full_tokens
        if self.meter is not None:
            self.meter.mark_partial()
        self._pending.append(info)
        return args, kwargs

    def _after_call(self, _module: Any, _args: tuple, _kwargs: dict[str, Any], output: Any):
        info = self._pending.pop() if self._pending else {"kind": "full"}
        self.call_factor = 1
        if info["kind"] == "full":
            return None
        sample = output[0] if isinstance(output, tuple) else output.sample
        if info["kind"] == "low":
            full = self.layout.from_grid(up_nearest(self.layout.to_grid(sample), info["factor"]).contiguous())
        else:
            full = self._mixed_output(sample, info)
        if isinstance(output, tuple):
            return (full, *output[1:])
        output.sample = full
        return output

    def _tokens(self, x: torch.Tensor) -> int:
        if isinstance(self.layout, FluxLayout):
            return int(x.shape[1])
        p = getattr(self.layout, "patch", (1, 1, 1))
        return int(x.shape[-3] // p[0] * (x.shape[-2] // p[1]) * (x.shape[-1] // p[2]))

    # -- RALU's mixed stage (FLUX layout only)
    def _mixed_inputs(self, x: torch.Tensor, stage: Stage, kwargs: dict[str, Any]) -> dict[str, Any]:
        layout: FluxLayout = self.layout  # type: ignore[assignment]
        f = stage.factor
        low = layout.from_grid(down_nearest(layout.to_grid(x), f).contiguous())
        keep, children, child_ids = region_tokens(stage.region, layout, f, x)
        low_ids = layout.ids(f, kwargs["img_ids"])
        kwargs["hidden_states"] = torch.cat([low[:, keep], x[:, children]], 1)
        kwargs["img_ids"] = torch.cat([low_ids[keep], child_ids.to(low_ids.dtype)], 0)
        return {"kind": "mixed", "factor": f, "keep": keep, "children": children, "low_tokens": low.shape[1]}

    def _mixed_output(self, sample: torch.Tensor, info: dict[str, Any]) -> torch.Tensor:
        layout: FluxLayout = self.layout  # type: ignore[assignment]
        n_keep = len(info["keep"])
        low = sample.new_zeros(sample.shape[0], info["low_tokens"], sample.shape[2])
        low[:, info["keep"]] = sample[:, :n_keep]
        full = layout.from_grid(up_nearest(layout.grid_of(low, info["factor"]), info["factor"]).contiguous())
        full[:, info["children"]] = sample[:, n_keep:]
        return full

    def stats(self) -> dict[str, Any]:
        c = self.counts
        out = {
            "stage_steps": c.stage_steps,
            "stage_factors": [s.factor for s in self.stages],
            "stage_sigmas": [[round(s.sigmas[0], 4), round(s.sigmas[-1], 4)] for s in self.stages],
            "full_res_calls": c.full_calls,
            "low_res_calls": c.low_calls,
            "mixed_res_calls": c.mixed_calls,
            "token_evals": c.tokens,
            "token_evals_at_full_res": c.tokens_full,
            "token_fraction": round(c.tokens / c.tokens_full, 4) if c.tokens_full else None,
        }
        if self.meter is not None:
            out.update(self.meter.stats())
        return out


def region_tokens(region: torch.Tensor, layout: FluxLayout, factor: int, like: torch.Tensor):
    """Indices of the kept low-resolution tokens, of the full-resolution tokens covering the
    upsampled regions, and those tokens' positions on the low-resolution grid (half-integer
    offsets, as RALU places them)."""
    rows, cols = region.shape
    flat = region.reshape(-1)
    keep = torch.nonzero(~flat).flatten()
    picked = torch.nonzero(flat).flatten()
    r, c = picked // cols, picked % cols
    full_cols = cols * factor
    offsets = torch.arange(factor)
    child_r = (r[:, None, None] * factor + offsets[None, :, None]).expand(-1, factor, factor)
    child_c = (c[:, None, None] * factor + offsets[None, None, :]).expand(-1, factor, factor)
    children = (child_r * full_cols + child_c).reshape(-1)
    scale = 1 if layout.scaled else factor  # full-grid coordinates, or the low grid's with half steps
    pos_r = child_r.reshape(-1).to(torch.float64) / scale
    pos_c = child_c.reshape(-1).to(torch.float64) / scale
    ids = torch.stack([torch.zeros_like(pos_r), pos_r, pos_c], 1).to(like.device, torch.float32)
    return keep.to(like.device), children.to(like.device), ids


def solver_note(backend: Any, method: str) -> list[str]:
    """A swapped flow solver (``sampler(scheduler=...)``) is not used: the stages step with Euler."""
    name = type(backend.pipe.scheduler).__name__
    if name != "FlowMatchEulerDiscreteScheduler":
        return [f"{method} steps its stages with flow Euler; the {name} solver is not used"]
    return []


def flow_x0(x: torch.Tensor, v: torch.Tensor, sigma: float) -> torch.Tensor:
    """Tweedie's clean estimate of a flow latent at ``sigma`` from the velocity (noise - x0)."""
    return x - sigma * v


def check_steps(stages: list[Stage], method: str) -> None:
    for k, stage in enumerate(stages):
        if stage.steps < 1:
            raise ValidationError(f"{method}: stage {k + 1} has no step; raise the step count or move the boundaries")
