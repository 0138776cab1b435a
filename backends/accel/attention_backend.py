"""Attention backend choice through diffusers' dispatcher (``set_attention_backend``).

The same scaled-dot-product attention, computed by another kernel: PyTorch SDPA with a
forced kernel (math, flash, memory-efficient, cuDNN), FlexAttention, or an external
library (FlashAttention 2/3, SageAttention, xFormers). Exact up to floating-point
rounding, except SageAttention, which quantizes Q/K to INT8 (lossy). Flash attention:
Dao et al. 2022/2023; SageAttention: Zhang et al. 2025.
"""

from __future__ import annotations

from typing import Any

from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.plan import DiffusionPlan, RunHandle
from backends.types import ValidationError

CPU_BACKENDS = ("native", "_native_math", "_native_flash", "flex")
GPU_BACKENDS = ("_native_efficient", "_native_cudnn", "flash", "flash_varlen", "_flash_3", "sage", "xformers")
LOSSY_BACKENDS = ("sage",)


def dispatched_processors(denoiser) -> list[Any]:
    """Attention processors that route through diffusers' dispatcher (they carry an
    ``_attention_backend`` slot); older processors call SDPA directly and ignore the choice."""
    from diffusers.hooks._common import _ATTENTION_CLASSES

    return [m.processor for m in denoiser.modules()
            if isinstance(m, _ATTENTION_CLASSES) and hasattr(getattr(m, "processor", None), "_attention_backend")]


class AttentionBackendConfig(MethodConfig):
    backend: str = param("native", choices=CPU_BACKENDS + GPU_BACKENDS,
                         help="native = PyTorch SDPA picking its kernel; _native_math/_native_flash force one "
                              "(both also run on CPU); flex = FlexAttention (slow on CPU without compile); the "
                              "rest need a CUDA GPU and, for flash/sage/xformers, their package. sage quantizes "
                              "Q/K to INT8 and is lossy")


@register
class AttentionBackendMethod(Method):
    spec = MethodSpec(
        name="attention_backend",
        title="Attention backend",
        modalities=("image", "video"),
        families=("dit", "video-dit"),
        summary="Compute attention with another kernel (SDPA variants, FlexAttention, FlashAttention, "
                "SageAttention, xFormers); exact except SageAttention.",
        paper="Dao 2023, FlashAttention-2; Zhang et al. 2025, SageAttention; PyTorch SDPA / FlexAttention",
        lossless=None,  # exact up to rounding, except the quantized 'sage'
        config=AttentionBackendConfig,
        slots=("attention",),
    )

    def attach(self, backend, plan: DiffusionPlan) -> RunHandle:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        name = self.config.backend
        denoiser = backend.denoiser
        if denoiser is None or not hasattr(denoiser, "set_attention_backend"):
            raise ValidationError("attention_backend needs a diffusers model with set_attention_backend()")
        processors = dispatched_processors(denoiser)
        if not processors:
            raise ValidationError(f"the attention of {type(denoiser).__name__} does not go through diffusers' "
                                  "dispatcher, so the attention backend cannot be chosen for it")
        if name in GPU_BACKENDS and backend.device.type != "cuda":
            raise ValidationError(f"attention backend '{name}' needs a CUDA GPU; this model runs on "
                                  f"{backend.device.type}. On CPU use one of {list(CPU_BACKENDS)}")
        handle = RunHandle(plan, lambda: {"backend": name, "processors": len(processors),
                                          "lossless": name not in LOSSY_BACKENDS},
                           lambda _plan: self.notes(backend))
        # reset_attention_backend() would leave diffusers' global active backend changed:
        # put back each processor's own choice and the global one.
        handle.on_remove(_AttentionBackendRegistry.set_active_backend, _AttentionBackendRegistry._active_backend)
        for processor in processors:
            handle.on_remove(setattr, processor, "_attention_backend", processor._attention_backend)
        try:
            denoiser.set_attention_backend(name)
        except (RuntimeError, ValueError) as exc:
            handle.remove()
            raise ValidationError(f"attention backend '{name}' is not usable here: {exc}") from None
        return handle

    def notes(self, backend) -> list[str]:
        if self.config.backend == "flex" and backend.device.type == "cpu":
            return ["FlexAttention without torch.compile materializes the full score matrix: "
                    "slower than native on CPU"]
        if self.config.backend == "native":
            return ["attention backend 'native' is the default: nothing changes"]
        return []
