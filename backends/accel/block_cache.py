"""Δ-DiT / FORA block caching: reuse the residual of a span of DiT blocks between full steps.

FORA (Selvaraju et al. 2024, "Fast-Forward Caching in Diffusion Transformer
Acceleration") recomputes the blocks' attention and MLP outputs every N steps and reuses
them in between; Δ-DiT (Chen et al. 2024, "Δ-DiT: A Training-Free Acceleration Method
Tailored for Diffusion Transformers") caches the *deviation* (output minus input) of a
group of blocks, the rear blocks or the front ones. Both come to the same thing here: on a
cached step the span of ``num_blocks`` blocks at the ``rear`` (or ``front``) answers
``input + residual`` from the last full step, and the rest of the model runs as usual.
Full computation every ``interval`` steps, and always during ``warmup_steps``.
"""

from __future__ import annotations

from typing import Any

from backends.accel._block_span import SpanCache, block_lists, step_stats
from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.plan import DiffusionPlan, RunHandle
from backends.types import ValidationError


class BlockCacheConfig(MethodConfig):
    interval: int = param(2, min=1, max=10,
                          help="full computation every N steps (Δ-DiT: 2; FORA: 3); 1 disables reuse")
    num_blocks: int = param(0, min=0, max=200,
                            help="blocks in the cached span; 0 = all blocks (FORA-style whole-stack reuse)")
    position: str = param("rear", choices=("rear", "front"),
                          help="which end of the block stack is cached (Δ-DiT: rear blocks keep the outline)")
    warmup_steps: int = param(1, min=0, max=50, help="first steps that are always computed in full")


def span_of(blocks: list, num_blocks: int, position: str) -> list:
    n = len(blocks) if num_blocks <= 0 else min(num_blocks, len(blocks))
    return blocks[len(blocks) - n:] if position == "rear" else blocks[:n]


def is_full_step(step: int, config: BlockCacheConfig) -> bool:
    return step < config.warmup_steps or (step - config.warmup_steps) % config.interval == 0


def apply_block_cache(denoiser, config: BlockCacheConfig) -> SpanCache:
    """Hook the span; returns the handle whose ``remove()`` undoes it.

    >>> cache = apply_block_cache(pipe.transformer, BlockCacheConfig(interval=2, num_blocks=8))
    >>> image = pipe("a red circle").images[0]
    >>> cache.remove()
    """
    blocks = [block for _, block in block_lists(denoiser)]
    span = span_of(blocks, config.num_blocks, config.position)

    def reuse(_module, _args, _kwargs, state) -> bool:
        return not is_full_step(state.calls, config)

    return SpanCache(denoiser, span, reuse, "block_cache")


@register
class BlockCacheMethod(Method):
    spec = MethodSpec(
        name="block_cache",
        title="Block cache (Δ-DiT / FORA)",
        modalities=("image", "video"),
        families=("dit", "video-dit"),
        summary="Every N steps run all blocks; in between a span of rear (or front) blocks answers "
                "its input plus the residual it added at the last full step.",
        paper="Chen et al. 2024, Δ-DiT (arXiv 2406.01125); Selvaraju et al. 2024, FORA (arXiv 2407.01425)",
        lossless=False,
        config=BlockCacheConfig,
        slots=("dit-cache",),
    )

    def attach(self, backend, plan: DiffusionPlan) -> RunHandle:
        denoiser = backend.denoiser
        total_blocks = len(block_lists(denoiser))
        if not total_blocks:
            raise ValidationError(f"block_cache found no transformer block list in {type(denoiser).__name__}")
        span = len(span_of(list(range(total_blocks)), self.config.num_blocks, self.config.position))
        cache = apply_block_cache(denoiser, self.config)

        def stats() -> dict[str, Any]:
            steps = step_stats(cache.calls, whole_stack=span == total_blocks)
            return {
                "full_steps": steps["computed_steps"],
                "cached_steps": steps["skipped_steps"],
                "span_blocks": span,
                "blocks_skipped": steps["skipped_calls"] * span,
                "skipped_evals": steps["skipped_evals"],
                "branches": steps["branches"],
                "cache_hit_rate": steps["cache_hit_rate"],
                **cache.costs.stats(),
            }

        handle = RunHandle(plan, stats, lambda plan: self.notes(plan, total_blocks),
                           lambda: step_stats(cache.calls, whole_stack=span == total_blocks)["skipped_evals"])
        handle.on_remove(cache.remove)
        return handle

    def notes(self, plan: DiffusionPlan, total: int) -> list[str]:
        steps = plan.steps
        config = self.config
        notes = []
        if config.interval <= 1:
            notes.append("block_cache with interval 1 computes every step: no speed-up")
        elif steps <= max(config.warmup_steps, 1):
            notes.append(f"block_cache: all {steps} steps are warm-up steps, nothing is reused")
        elif not any(not is_full_step(s, config) for s in range(steps)):
            notes.append(f"block_cache at {steps} steps with interval {config.interval} reuses no step")
        if config.num_blocks > total > 0:
            notes.append(f"block_cache: the model has {total} blocks, so the span is all of them")
        return notes
