"""``torch.compile`` of the denoiser (Ansel et al. 2024, "PyTorch 2: Faster Machine
Learning Through Dynamic Python Bytecode Transformation and Graph Compilation").

TorchDynamo captures the forward into graphs and Inductor fuses them into generated
kernels (Triton on GPU, C++/OpenMP on CPU). Regional compilation (diffusers
``compile_repeated_blocks``) compiles the repeated transformer block once and reuses it
for every instance: a fraction of the compile time of the whole model for most of the
speed. The first run with a new shape pays the compilation (tens of seconds on a GPU,
minutes on a CPU); later runs reuse it. Lossless up to kernel rounding.
"""

from __future__ import annotations

from typing import Any

import torch

from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.plan import DiffusionPlan, RunHandle
from backends.types import ValidationError


class CompileConfig(MethodConfig):
    scope: str = param("regional", choices=("regional", "full"),
                       help="regional: compile the repeated block class once (diffusers compile_repeated_blocks),"
                            " falling back to full when the model has none; full: the whole denoiser (longer "
                            "compile)")
    mode: str = param("default", choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                      help="torch.compile mode; reduce-overhead uses CUDA graphs (GPU only). The first run "
                           "compiles: seconds to minutes, much longer on CPU")
    compiler: str = param("inductor", choices=("inductor", "aot_eager", "eager"),
                          help="inductor generates fused kernels (the speed-up); aot_eager / eager only trace, "
                               "for debugging graph breaks")
    fullgraph: bool = param(False, help="fail instead of falling back on a graph break")


@register
class CompileMethod(Method):
    spec = MethodSpec(
        name="compile",
        title="torch.compile",
        modalities=("image", "video", "audio"),
        families=("unet", "dit", "video-dit", "audio-unet", "audio-dit"),
        summary="Compile the denoiser's repeated blocks (or the whole denoiser) with torch.compile; "
                "the first run pays the compilation.",
        paper="Ansel et al. 2024, PyTorch 2 (TorchDynamo + TorchInductor), ASPLOS",
        lossless=True,
        config=CompileConfig,
    )

    def attach(self, backend, plan: DiffusionPlan) -> RunHandle:
        denoiser = backend.denoiser
        if denoiser is None:
            raise ValidationError("compile: this backend has no denoiser to compile")
        mode = self.config.mode
        if mode == "reduce-overhead" and backend.device.type != "cuda":
            raise ValidationError("compile mode 'reduce-overhead' uses CUDA graphs and needs a CUDA GPU")
        kwargs: dict[str, Any] = {"backend": self.config.compiler, "fullgraph": self.config.fullgraph}
        if self.config.compiler == "inductor":
            kwargs["mode"] = mode
        repeated = set(getattr(denoiser, "_repeated_blocks", None) or ())
        targets = [m for m in denoiser.modules() if type(m).__name__ in repeated] \
            if self.config.scope == "regional" else []
        scope = "regional" if targets else "full"
        targets = targets or [denoiser]
        notes = []
        if backend.device.type == "cpu" and self.config.compiler == "inductor":
            notes.append("compile on CPU: the first run with this shape compiles C++ kernels and can take minutes")
        handle = RunHandle(plan, lambda: {"scope": scope, "compiled_modules": len(targets)}, lambda _plan: notes)
        for module in targets:
            # Module.compile sets _compiled_call_impl; putting the previous value back is the undo.
            handle.on_remove(setattr, module, "_compiled_call_impl", module._compiled_call_impl)
            module.compile(**kwargs)
        return handle
