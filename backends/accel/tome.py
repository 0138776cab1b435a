"""ToMe for SD (Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion").

Neighbouring latent tokens are often nearly identical, and self-attention costs grow
with the square of their number. Before each self-attention (``attn1``) of the UNet's
high-resolution transformer blocks, ToMe splits the tokens into destinations (one random
token per 2x2 patch) and sources, merges the ``ratio`` most similar sources into their
best-matching destination (bipartite soft matching on cosine similarity of the block
input), runs attention on the shorter sequence, and unmerges the output by copying each
merged token's result back to every token it stood for. No training; lossy.

Randomness comes from a generator reseeded at every run, so a seed still means one image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from backends.accel._patch import ForwardPatch
from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.plan import DiffusionPlan, RunHandle
from backends.types import ValidationError

MergeFn = Callable[[torch.Tensor], torch.Tensor]


class ToMeConfig(MethodConfig):
    """The attention cost falls roughly with ``(1 - ratio)^2``; up to ~0.6 keeps SD images
    close. ``sx``/``sy``: the patch in which one destination token is picked (2x2)."""

    ratio: float = param(0.5, min=0.0, max=0.75, step=0.05,
                         help="fraction of tokens merged away before self-attention (paper default 0.5; "
                              "at most 0.75 with 2x2 patches)")
    max_downsample: int = param(1, choices=(1, 2, 4, 8),
                                help="merge in levels downsampled at most this much from the highest-resolution "
                                     "level with attention (1 = that level only, paper default)")
    use_rand: bool = param(True, help="random destination token per 2x2 patch (paper) or fixed")
    merge_crossattn: bool = param(False, help="also merge cross-attention queries (faster, rougher)")
    merge_mlp: bool = param(False, help="also merge the MLP input (faster, rougher)")
    sx: int = 2
    sy: int = 2
    seed: int = 0


def bipartite_soft_matching_random2d(metric: torch.Tensor, w: int, h: int, sx: int, sy: int, r: int,
                                     use_rand: bool, generator: torch.Generator) -> tuple[MergeFn, MergeFn]:
    """ToMe for SD's matching: one destination per ``sy x sx`` patch, every other token a
    source; each source's best destination by cosine similarity; the ``r`` most similar
    sources are merged (averaged) into their destinations. Returns (merge, unmerge)."""
    B, N, _ = metric.shape
    if r <= 0:
        return (lambda x: x), (lambda x: x)
    with torch.no_grad():
        hsy, wsx = h // sy, w // sx
        if use_rand:
            rand_idx = torch.randint(sy * sx, size=(hsy, wsx, 1), generator=generator).to(metric.device)
        else:
            rand_idx = torch.zeros(hsy, wsx, 1, device=metric.device, dtype=torch.int64)
        idx_buffer_view = torch.zeros(hsy, wsx, sy * sx, device=metric.device, dtype=torch.int64)
        idx_buffer_view.scatter_(dim=2, index=rand_idx, src=-torch.ones_like(rand_idx))
        idx_buffer_view = idx_buffer_view.view(hsy, wsx, sy, sx).transpose(1, 2).reshape(hsy * sy, wsx * sx)
        if hsy * sy < h or wsx * sx < w:  # the grid does not divide: leftover rows/cols are sources
            idx_buffer = torch.zeros(h, w, device=metric.device, dtype=torch.int64)
            idx_buffer[: hsy * sy, : wsx * sx] = idx_buffer_view
        else:
            idx_buffer = idx_buffer_view
        # destinations are -1, sources 0: a stable argsort lists destinations first
        order = idx_buffer.reshape(1, -1, 1).argsort(dim=1, stable=True)
        num_dst = hsy * wsx
        a_idx, b_idx = order[:, num_dst:, :], order[:, :num_dst, :]

        def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            C = x.shape[-1]
            src = torch.gather(x, dim=1, index=a_idx.expand(B, N - num_dst, C))
            dst = torch.gather(x, dim=1, index=b_idx.expand(B, num_dst, C))
            return src, dst

        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = split(metric)
        scores = a @ b.transpose(-1, -2)
        r = min(a.shape[1], r)
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
        unm_idx = edge_idx[..., r:, :]  # sources kept
        src_idx = edge_idx[..., :r, :]  # sources merged away
        dst_idx = torch.gather(node_idx[..., None], dim=-2, index=src_idx)

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = split(x)
        n, t1, c = src.shape
        unm = torch.gather(src, dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = torch.gather(src, dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="mean")
        return torch.cat([unm, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        unm_len = unm_idx.shape[1]
        unm, dst = x[..., :unm_len, :], x[..., unm_len:, :]
        c = unm.shape[-1]
        src = torch.gather(dst, dim=-2, index=dst_idx.expand(B, r, c))
        out = torch.zeros(B, N, c, device=x.device, dtype=x.dtype)
        out.scatter_(dim=-2, index=b_idx.expand(B, num_dst, c), src=dst)
        a_all = a_idx.expand(B, a_idx.shape[1], 1)
        out.scatter_(dim=-2, index=torch.gather(a_all, dim=1, index=unm_idx).expand(B, unm_len, c), src=unm)
        out.scatter_(dim=-2, index=torch.gather(a_all, dim=1, index=src_idx).expand(B, r, c), src=src)
        return out

    return merge, unmerge


def transformer_block_levels(unet: torch.nn.Module) -> list[tuple[torch.nn.Module, int]]:
    """Every BasicTransformerBlock of a UNet2DConditionModel with its downsampling factor."""
    from diffusers.models.attention import BasicTransformerBlock

    def blocks_in(module):
        return [m for m in module.modules() if isinstance(m, BasicTransformerBlock)]

    found, factor = [], 1
    for block in unet.down_blocks:
        found += [(b, factor) for b in blocks_in(block)]
        if getattr(block, "downsamplers", None):
            factor *= 2
    if getattr(unet, "mid_block", None) is not None:
        found += [(b, factor) for b in blocks_in(unet.mid_block)]
    for block in unet.up_blocks:
        found += [(b, factor) for b in blocks_in(block)]
        if getattr(block, "upsamplers", None):
            factor //= 2
    return found


@dataclass
class ToMeState:
    size: tuple[int, int] | None = None  # latent (H, W) of the current UNet call
    calls: int = 0
    tokens_before: int = 0
    tokens_after: int = 0

    def reset(self) -> None:
        self.size, self.calls, self.tokens_before, self.tokens_after = None, 0, 0, 0


class ToMePatch:
    """The patches of one run: a pre-hook on the UNet (latent size), and per chosen block a
    forward patch that builds the merge for this call plus patches on ``attn1`` (and
    optionally ``attn2`` / ``ff``) that merge their input and unmerge their output."""

    def __init__(self, unet: torch.nn.Module, config: ToMeConfig):
        self.config, self.state = config, ToMeState()
        self.generator = torch.Generator().manual_seed(config.seed)
        levels = transformer_block_levels(unet)
        if not levels:
            raise ValidationError("tome found no transformer blocks (BasicTransformerBlock) in this UNet")
        finest = min(factor for _, factor in levels)
        self.blocks = [b for b, factor in levels if factor <= finest * config.max_downsample]
        self.hook = unet.register_forward_pre_hook(self._capture_size, with_kwargs=True)
        self.patches: list[ForwardPatch] = []
        for block in self.blocks:
            slot: dict[str, Any] = {}
            self.patches.append(ForwardPatch(block, self._block_forward(block, slot)))
            self.patches.append(ForwardPatch(block.attn1, self._merged(slot, count=True)))
            if config.merge_crossattn and getattr(block, "attn2", None) is not None:
                self.patches.append(ForwardPatch(block.attn2, self._merged(slot)))
            if config.merge_mlp and getattr(block, "ff", None) is not None and block._chunk_size is None:
                self.patches.append(ForwardPatch(block.ff, self._merged(slot)))

    def _capture_size(self, _module, args, kwargs):
        sample = kwargs.get("sample", args[0] if args else None)
        self.state.size = tuple(sample.shape[-2:])

    def _block_forward(self, block, slot):
        config = self.config

        def make(original):
            def forward(hidden_states, *args, **kwargs):
                slot["fns"] = None
                if hidden_states.ndim == 3 and self.state.size is not None:
                    H, W = self.state.size
                    N = hidden_states.shape[1]
                    ds = int(math.ceil(math.sqrt(H * W / N)))
                    h, w = int(math.ceil(H / ds)), int(math.ceil(W / ds))
                    if h * w == N:
                        slot["fns"] = bipartite_soft_matching_random2d(
                            hidden_states, w, h, config.sx, config.sy, int(N * config.ratio),
                            config.use_rand, self.generator)
                try:
                    return original(hidden_states, *args, **kwargs)
                finally:
                    slot["fns"] = None

            return forward

        return make

    def _merged(self, slot, count: bool = False):
        def make(original):
            def forward(hidden_states, *args, **kwargs):
                fns = slot.get("fns")
                if fns is None or kwargs.get("attention_mask") is not None:
                    return original(hidden_states, *args, **kwargs)
                merge, unmerge = fns
                merged = merge(hidden_states)
                if count:
                    self.state.calls += 1
                    self.state.tokens_before += hidden_states.shape[1]
                    self.state.tokens_after += merged.shape[1]
                return unmerge(original(merged, *args, **kwargs))

            return forward

        return make

    def remove(self) -> None:
        for patch in reversed(self.patches):
            patch.remove()
        self.patches = []
        self.hook.remove()


def apply_tome(unet: torch.nn.Module, config: ToMeConfig) -> ToMePatch:
    """Patch ``unet`` in place; ``remove()`` on the result restores it.

    >>> patch = apply_tome(pipe.unet, ToMeConfig(ratio=0.5))
    >>> image = pipe("a red circle").images[0]
    >>> patch.remove()
    """
    return ToMePatch(unet, config)


@register
class ToMeMethod(Method):
    spec = MethodSpec(
        name="tome",
        title="ToMe (token merging)",
        modalities=("image", "audio"),
        families=("unet", "audio-unet"),
        summary="Merge similar latent tokens before the UNet's high-resolution self-attention and "
                "unmerge after: fewer tokens, quadratically cheaper attention.",
        paper="Bolya & Hoffman 2023, Token Merging for Fast Stable Diffusion (CVPR-W)",
        lossless=False,
        config=ToMeConfig,
    )

    def attach(self, backend, plan: DiffusionPlan) -> RunHandle:
        unet = getattr(backend.pipe, "unet", None)
        if unet is None or not hasattr(unet, "down_blocks"):
            raise ValidationError("tome needs a diffusers UNet (UNet2DConditionModel-like) denoiser")
        patch = apply_tome(unet, self.config)

        def stats() -> dict[str, Any]:
            s = patch.state
            return {
                "merged_blocks": len(patch.blocks),
                "attention_calls": s.calls,
                "tokens_before": s.tokens_before,
                "tokens_after": s.tokens_after,
                "token_ratio": round(s.tokens_after / s.tokens_before, 3) if s.tokens_before else 1.0,
            }

        notes = ["tome with ratio 0 merges no tokens: no speed-up"] if self.config.ratio <= 0 else []
        handle = RunHandle(plan, stats, lambda _plan: notes)
        handle.on_remove(patch.remove)
        return handle
