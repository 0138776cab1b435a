"""dKV-Cache (Ma et al. 2025, "dKV-Cache: The Cache for Diffusion Language Models"),
its dKV-Cache-Decode variant: delayed caching of the K/V of decoded tokens.

A diffusion LM recomputes every position at every step because attention is
bidirectional. The paper observes that a token's K/V change sharply at the step it is
decoded (its input goes from the mask to the token) and little afterwards, so it caches a
token's K/V *one step after* it is decoded, computed with the token itself as input, and
reuses them from then on; masked positions (whose inputs are still masks) are recomputed
at every step, and the prompt is cached from the first step. ``refresh_interval`` > 0
recomputes the whole sequence every that many steps (0: never after the first). Lossy:
a cached K/V does not see tokens decoded later.

The loop is ``backends/accel/_dllm_decoding.py`` (``cache="delayed"``); this method only
sets the plan's fields. Steps and block size stay the request's own.
"""

from __future__ import annotations

from backends.accel.base import Limits, Method, MethodConfig, MethodSpec, param, register
from backends.accel._dllm_decoding import DiffusionDecodingPlan
from backends.accel.fast_dllm import DLLM_SLOT, dllm_stats, has_kv_cache
from backends.plan import RunHandle


class DKVCacheConfig(MethodConfig):
    refresh_interval: int = param(0, min=0, max=1024,
                                  help="recompute every position every this many steps (0 = only at the first step)")


@register
class DKVCacheMethod(Method):
    spec = MethodSpec(
        name="dkv_cache",
        title="dKV-Cache (delayed KV cache for diffusion LMs)",
        modalities=("text",),
        families=("diffusion-lm",),
        summary="Diffusion LM: caches a decoded token's K/V one step after it is decoded and recomputes only the "
                "masked positions; lossy.",
        paper="Ma et al. 2025, dKV-Cache: The Cache for Diffusion Language Models (arXiv 2505.15781)",
        lossless=False,
        config=DKVCacheConfig,
        slots=(DLLM_SLOT,),
    )

    @classmethod
    def limits(cls, backend) -> Limits:
        """The method is a K/V cache: no use on a model without a K/V cache interface."""
        if has_kv_cache(backend):
            return Limits()
        return Limits(unfit="dkv_cache: this diffusion LM's own code has no key/value cache interface, so the "
                            "delayed cache cannot run on it; use fast_dllm with cache=none instead")

    def attach(self, backend, plan: DiffusionDecodingPlan) -> RunHandle:
        plan.cache = "delayed"
        plan.refresh_interval = int(self.config.refresh_interval)
        return RunHandle(plan, stats=lambda: dllm_stats(plan))
