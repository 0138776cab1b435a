"""Sliding Tile Attention (Zhang et al. 2025, "Fast Video Generation with Sliding Tile
Attention"): the video DiT's self-attention looks only at a window of tiles around each
query tile.

The self-attention processors of the transformer (``WanAttnProcessor`` on the ``attn1``
of each block) are swapped for ``STAWanAttnProcessor``, which computes Q/K/V, the norms
and the rotary embedding exactly as Wan does, then calls
``kernels.sta.sliding_tile_attention`` on the token grid ``(frames, height, width) /
patch`` read from the latent entering the transformer. Cross-attention (text) is left
alone. The first ``full_attention_steps`` denoising steps keep dense attention, as the
paper does (FastVideo's Wan recipe keeps 12 of 50 steps dense): the early steps set the
global layout, where long-range attention matters.

Lossy: outputs change wherever a query's dense attention reached outside its window. The
gain is the attention share of a step times ``1 - kept_fraction`` at best; on the tiny
CPU models attention is a small part of a step, on real 720p video DiTs it dominates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from backends.accel._patch import StepCallback
from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.plan import DiffusionPlan, RunHandle
from backends.types import ValidationError


@dataclass
class STAState:
    """What the processors share during one run."""

    grid: tuple[int, int, int] | None = None  # token grid of the current transformer call
    sta_calls: int = 0
    full_calls: int = 0
    pairs_computed: int = 0  # (query, key) token pairs over all self-attention calls
    pairs_dense: int = 0
    grids: set = field(default_factory=set)


def _apply_rotary_emb(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # As in diffusers' WanAttnProcessor (a local function there).
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class STAWanAttnProcessor:
    """Wan self-attention with sliding tile attention; anything else (a mask, text keys,
    a token count that is not the grid, the dense steps) goes to the original processor."""

    def __init__(self, original: Any, state: STAState, method: "STAMethod", counter: StepCallback):
        self.original = original
        self.state = state
        self.method = method
        self.counter = counter

    def __getattr__(self, name: str) -> Any:  # _attention_backend, _parallel_config, ...
        original = self.__dict__.get("original")
        if original is None:
            raise AttributeError(name)
        return getattr(original, name)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        state, config = self.state, self.method.config
        grid = state.grid
        batch, tokens = hidden_states.shape[:2]
        use_sta = (encoder_hidden_states is None and attention_mask is None and not kwargs and grid is not None
                   and tokens == math.prod(grid) and self.counter.step >= config.full_attention_steps)
        pairs = batch * attn.heads * tokens * tokens
        state.pairs_dense += pairs
        if not use_sta:
            state.full_calls += 1
            state.pairs_computed += pairs
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)

        from kernels.sta import kept_fraction, sliding_tile_attention

        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        if rotary_emb is not None:
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)
        tile, window = self.method.tile, self.method.window
        out = sliding_tile_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                     grid=grid, tile=tile, window=window, backend=config.backend)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        state.sta_calls += 1
        state.pairs_computed += round(pairs * kept_fraction(grid, tile, window))
        state.grids.add(grid)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def self_attention_modules(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    from diffusers.models.transformers.transformer_wan import WanAttention

    return [m for m in denoiser.modules() if isinstance(m, WanAttention) and not m.is_cross_attention]


def wan_self_attention(denoiser, method: str) -> tuple[list[torch.nn.Module], tuple[int, ...]]:
    """The Wan self-attention modules a sparse-attention method replaces the processor of,
    and the 3-D patch size that maps tokens to the (t, h, w) grid; a one-line refusal for
    any other denoiser (shared by STA and Sparse-vDiT)."""
    modules = self_attention_modules(denoiser) if denoiser is not None else []
    if not modules:
        raise ValidationError(f"{method} supports Wan video transformers (WanAttention self-attention); "
                              f"{type(denoiser).__name__} has none")
    patch = getattr(denoiser.config, "patch_size", None)
    if patch is None or len(patch) != 3:
        raise ValidationError(f"{method} needs a transformer with a 3-D patch_size (t, h, w)")
    if any(isinstance(m.processor, torch.nn.Module) for m in modules):
        raise ValidationError(f"{method} cannot replace an attention processor that holds weights")
    return modules, tuple(int(p) for p in patch)


class STAConfig(MethodConfig):
    tile_t: int = param(6, min=1, max=64, help="tokens per tile along time (paper: 6)")
    tile_h: int = param(8, min=1, max=128, help="tokens per tile along height (paper: 8)")
    tile_w: int = param(8, min=1, max=128, help="tokens per tile along width (paper: 8)")
    window_t: int = param(3, min=1, max=64, help="key tiles per query tile along time (odd centres it; paper: 3)")
    window_h: int = param(3, min=1, max=64, help="key tiles along height (paper: 3)")
    window_w: int = param(3, min=1, max=64, help="key tiles along width (paper: 3)")
    full_attention_steps: int = param(12, min=0, max=1000, help="first denoising steps that keep dense attention "
                                                                "(FastVideo's Wan recipe: 12 of 50)")
    backend: str = param("auto", choices=("auto", "flex", "sdpa", "triton", "torch"),
                         help="auto = triton kernel on a CUDA GPU, else compiled FlexAttention; flex = "
                              "block-sparse FlexAttention (first call compiles, 20 s+ on CPU); sdpa = one fused "
                              "SDPA call per distinct window (no compile); torch = the reference (slow, exact "
                              "mask)")


@register
class STAMethod(Method):
    spec = MethodSpec(
        name="sta",
        title="Sliding tile attention (STA)",
        modalities=("video",),
        families=("video-dit",),
        summary="Video self-attention restricted to a window of tiles around each query tile "
                "(block-sparse, no wasted blocks); dense for the first steps.",
        paper="Zhang et al. 2025, Fast Video Generation with Sliding Tile Attention",
        lossless=False,
        config=STAConfig,
        slots=("attention",),
    )

    @property
    def tile(self) -> tuple[int, int, int]:
        return self.config.tile_t, self.config.tile_h, self.config.tile_w

    @property
    def window(self) -> tuple[int, int, int]:
        return self.config.window_t, self.config.window_h, self.config.window_w

    def attach(self, backend, plan: DiffusionPlan) -> RunHandle:
        denoiser = backend.denoiser
        modules, patch_size = wan_self_attention(denoiser, "STA")
        state, counter = STAState(), StepCallback()
        plan.callbacks.append(counter)

        def record_grid(_module, args, kwargs) -> None:
            latent = kwargs.get("hidden_states", args[0] if args else None)
            state.grid = None if latent is None or latent.ndim != 5 else \
                tuple(s // p for s, p in zip(latent.shape[2:], patch_size))

        handle = RunHandle(plan, lambda: self.run_stats(state), self.notes)
        for module in modules:
            handle.on_remove(module.set_processor, module.processor)
            module.set_processor(STAWanAttnProcessor(module.processor, state, self, counter))
        handle.on_remove(denoiser.register_forward_pre_hook(record_grid, with_kwargs=True).remove)
        return handle

    def run_stats(self, state: STAState) -> dict[str, Any]:
        from kernels.sta import kept_fraction

        grids = sorted(state.grids)
        return {
            "sta_calls": state.sta_calls,
            "full_calls": state.full_calls,
            "grid": "x".join(map(str, grids[-1])) if grids else None,
            "kept_fraction": round(kept_fraction(grids[-1], self.tile, self.window), 4) if grids else 1.0,
            "attention_pairs": state.pairs_computed,
            "dense_attention_pairs": state.pairs_dense,
            "pairs_fraction": round(state.pairs_computed / state.pairs_dense, 4) if state.pairs_dense else 1.0,
        }

    def notes(self, plan: DiffusionPlan) -> list[str]:
        steps = plan.steps
        if self.config.full_attention_steps >= steps:
            return [f"STA keeps dense attention for the first {self.config.full_attention_steps} steps and "
                    f"this run has {steps}: it never applies"]
        return []
