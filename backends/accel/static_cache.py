"""Static KV cache (+ optional ``torch.compile``), transformers' ``cache_implementation="static"``.

The K/V cache is allocated once at its full length instead of growing by concatenation
every token, which removes a copy per token and per layer and gives every decoding step
the same shapes, which is what lets ``torch.compile`` capture the step as one graph
("Accelerating Generative AI with PyTorch II: GPT, Fast", PyTorch team 2023).

Lossless: same math, same greedy tokens. On CPU the gain without compilation is small or
negative (measured 0.94x on the tiny code LM: the cache is tiny, the copy is cheap);
codec LMs (MusicGen) take the same two ``generate`` settings. Compilation runs the inductor C++ backend, whose first call compiles for tens of seconds
and needs a working C++ compiler. On CUDA, compile + static cache is the classic 2-4x.

Autoregressive image models (family ``ar-image``) have no ``generate``: the method puts the
plain token loop over a ``StaticCache`` preallocated at prefix + image tokens in the plan
(``static_cache_loop``), so it takes the token-loop slot, as SJD does (their loops crop the
cache after rejected drafts; a static cache has nothing to crop to). Compilation is not
wired for that loop (``limits`` refuses it in one line).
"""

from __future__ import annotations

from backends.accel._ar_decoding import AR_FAMILY, AR_SLOT, set_ar_decoder, static_cache_loop
from backends.accel.base import NO_LIMITS, Limits, Method, MethodConfig, MethodSpec, param, register
from backends.accel._decoding import DecodingHandle
from backends.plan import ARImagePlan, DecodingPlan, RunHandle


class StaticCacheConfig(MethodConfig):
    compile: bool = param(False, help="torch.compile the forward (first run compiles for a long time; slow on "
                                      "CPU)")


@register
class StaticCacheMethod(Method):
    spec = MethodSpec(
        name="static_cache",
        title="Static KV cache (+ torch.compile)",
        modalities=("text", "audio", "image"),
        families=("causal-lm", "codec-lm", AR_FAMILY),
        summary="Preallocated fixed-shape KV cache; optionally compiles the decoding step.",
        paper="PyTorch team 2023, Accelerating Generative AI with PyTorch II: GPT, Fast",
        lossless=True,
        config=StaticCacheConfig,
        # "decoder": a language model's decoding; AR_SLOT: an AR image model's token loop
        slots=("decoder", AR_SLOT),
    )

    @classmethod
    def limits(cls, backend) -> Limits:
        if getattr(backend, "family", None) == AR_FAMILY:
            if not hasattr(getattr(backend, "pipe", None), "static_cache_config"):  # Janus: a multimodal cache
                return Limits(unfit=f"'{backend.model_id}' has no static-cache path (bundled token models only)")
            return Limits(choices={"compile": (False,)})  # compilation is not wired for the AR image loop
        return NO_LIMITS

    def attach(self, backend, plan: DecodingPlan | ARImagePlan) -> DecodingHandle | RunHandle:
        if backend.family == AR_FAMILY:
            handle = RunHandle(plan, stats=lambda: {"compiled": False, "static_cache": True})
            handle.on_remove(set_ar_decoder(plan, static_cache_loop))
            return handle
        plan.kwargs["cache_implementation"] = "static"
        if self.config.compile:
            from transformers.generation.configuration_utils import CompileConfig

            compile_config = CompileConfig()
            compile_config._compile_all_devices = True  # transformers compiles on CUDA/XPU only by default
            plan.kwargs.update(compile_config=compile_config, disable_compile=False)
        else:
            plan.kwargs["disable_compile"] = True
        notes = []
        if self.config.compile and backend.device.type == "cpu":
            notes = ["torch.compile on CPU: the first run compiles for tens of seconds (C++ inductor backend)"]
        return DecodingHandle(plan, lambda: {"compiled": bool(self.config.compile)}, lambda _plan: notes)
