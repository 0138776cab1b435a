"""Fast-dLLM (Wu et al. 2025, "Fast-dLLM: Training-free Acceleration of Diffusion LLM by
Enabling KV Cache and Parallel Decoding"): two changes to LLaDA-style decoding.

Block-wise approximate KV cache: decoding is semi-autoregressive in blocks, and the K/V of
tokens outside the block being decoded barely change while it is decoded. One full
forward at the start of each block keeps them; the block's later steps recompute only the
block (``dual``: the K/V after the block are kept too) or the block and everything after
it (``prefix``). Approximate: a kept K/V does not see the block's tokens being filled in.

Confidence-aware parallel decoding: each step commits every masked token of the block
whose confidence exceeds ``threshold``, not only the scheduled one, so a block needs fewer
steps when the model is sure (the paper argues the product of marginals is then close to
the joint). A threshold of 1.0 commits nothing extra and, with ``cache=none``, decodes
exactly as the baseline. The number of steps and the block size stay the request's own
(``steps``, ``block_length``); the paper's setting is block 32, threshold 0.9, dual cache.
``factor`` > 0 switches to the paper's factor-based rule (its scripts use factor 1.0):
commit the ``n`` most confident tokens for the largest ``n`` with ``(n + 1)(1 - c_n) <
factor``, which admits a second token at ``c > 0.67`` where the threshold rule wants 0.9.

The loop is ``backends/accel/_dllm_decoding.py``; this method only sets the plan's fields.
"""

from __future__ import annotations

from backends.accel.base import Limits, Method, MethodConfig, MethodSpec, param, register
from backends.accel._dllm_decoding import DiffusionDecodingPlan
from backends.plan import RunHandle

DLLM_SLOT = "dllm-decoding"  # methods that set how a diffusion LM's steps run


class FastDLLMConfig(MethodConfig):
    threshold: float = param(0.9, min=0.0, max=1.0, step=0.05, only_if=("factor", 0.0),
                             help="commit every masked token of the block whose confidence is above this in one "
                                  "step (1.0 = only the scheduled ones: the baseline's decoding; unused once "
                                  "factor is set)")
    factor: float = param(0.0, min=0.0, max=32.0, step=0.5,
                          help="the paper's factor rule instead of the threshold: commit the n most confident "
                               "tokens for the largest n with (n + 1)(1 - c_n) < factor (0 = off, threshold rule; "
                               "the paper's scripts use 1.0)")
    cache: str = param("dual", choices=("dual", "prefix", "none"),
                       help="block-wise approximate KV cache: dual = keep K/V before and after the block, "
                            "prefix = before it only, none = recompute everything every step")


def dllm_stats(plan: DiffusionDecodingPlan) -> dict:
    """The loop's work counts of the last run: denoising forwards, positions computed."""
    keys = ("denoising_forwards", "positions_computed", "positions_recomputed_share", "tokens_per_denoising_step")
    return {k: plan.extra[k] for k in keys if k in plan.extra}


def has_kv_cache(backend) -> bool:
    """Whether ``backend``'s diffusion LM runner can keep K/V (``Runner.supports_cache``);
    a backend without a runner is not refused here (the loop's ``check_plan`` still is)."""
    runner = getattr(backend, "runner", None)
    return runner is None or bool(getattr(runner, "supports_cache", True))


@register
class FastDLLMMethod(Method):
    spec = MethodSpec(
        name="fast_dllm",
        title="Fast-dLLM (block KV cache + parallel decoding)",
        modalities=("text",),
        families=("diffusion-lm",),
        summary="Diffusion LM: reuses the K/V outside the block being decoded and commits every token above a "
                "confidence threshold per step; lossy (exact at threshold 1.0 without the cache).",
        paper="Wu et al. 2025, Fast-dLLM: Training-free Acceleration of Diffusion LLM by Enabling KV Cache and "
              "Parallel Decoding (arXiv 2505.22618)",
        lossless=None,
        config=FastDLLMConfig,
        slots=(DLLM_SLOT,),
    )

    @classmethod
    def limits(cls, backend) -> Limits:
        """A model whose own code has no K/V cache interface (hub LLaDA; Dream has one):
        only cache=none fits it (parallel decoding alone)."""
        if has_kv_cache(backend):
            return Limits()
        return Limits(choices={"cache": ("none",)})

    def attach(self, backend, plan: DiffusionDecodingPlan) -> RunHandle:
        plan.threshold = float(self.config.threshold)
        plan.factor = float(self.config.factor) if self.config.factor > 0 else None
        plan.cache = self.config.cache
        return RunHandle(plan, stats=lambda: dllm_stats(plan), notes=self._notes)

    def _notes(self, plan: DiffusionDecodingPlan) -> list[str]:
        if plan.factor is None and plan.threshold >= 1.0 and plan.cache == "none":
            return ["threshold 1.0 without a cache decodes exactly as the baseline: nothing is saved"]
        return []
