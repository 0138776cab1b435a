"""Dynamic int8 quantization: int8 weights, and activations quantized to int8 at run time.

Weights are quantized once, per output row (symmetric int8); each matmul quantizes its
input on the fly (one scale per tensor on CPU, per token on GPU), multiplies in int8 with
int32 accumulation and rescales the result (Jacob et al. 2018; the scheme PyTorch ships as
``quantize_dynamic``). Unlike weight-only int8 the multiply itself runs in integers.

Kernels: on CPU torch's fbgemm ``quantized::linear_dynamic`` (what
``torch.ao.quantization.quantize_dynamic`` calls), wrapped as a weight tensor so the Linear
modules stay in place; on a GPU torchao's ``Int8DynamicActivationInt8WeightConfig``.
"""

from __future__ import annotations

from backends.accel import _quant
from backends.accel.base import Limits, Method, MethodConfig, MethodSpec, param, register
from backends.accel.weight_quant import (WEIGHT_FAMILIES, WEIGHT_SLOT, attach_quantized, denoiser_of,
                                         skip_blocks_limits)
from backends.plan import RunHandle, RunPlan
from backends.types import ValidationError


class DynamicQuantConfig(MethodConfig):
    skip_blocks: int = param(1, min=0, max=4,
                             help="keep the first and last N blocks in full precision (the sensitive ones)")
    skip_io: bool = param(True, help="keep layers outside the blocks in full precision: embeddings, output "
                                     "head, in/out projections, time and text embedders")


@register
class DynamicQuantMethod(Method):
    spec = MethodSpec(
        name="dynamic_quant",
        title="Dynamic int8 (W8A8)",
        modalities=("image", "video", "audio", "text"),
        families=WEIGHT_FAMILIES,
        summary="int8 weights, and activations quantized to int8 at each matmul (integer multiply). "
                "fbgemm's dynamic kernel on CPU, torchao on GPU; the original weights come back on removal.",
        paper="Jacob et al. 2018, Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-"
              "Only Inference (CVPR); PyTorch dynamic quantization",
        lossless=False,
        config=DynamicQuantConfig,
        slots=(WEIGHT_SLOT,),
    )

    @classmethod
    def limits(cls, backend) -> Limits:
        return skip_blocks_limits(backend, int(cls.spec.param("skip_blocks").max))

    def attach(self, backend, plan: RunPlan) -> RunHandle:
        cfg = self.config
        model = denoiser_of(backend)
        device = next(model.parameters()).device
        if device.type == "cpu":
            import torch

            if "fbgemm" not in torch.backends.quantized.supported_engines:
                raise ValidationError("dynamic int8 on CPU needs PyTorch's fbgemm engine (x86)")
            quantize, kernel = (lambda _name, w: _quant.dynamic_int8_weight(w)), "fbgemm linear_dynamic"
        else:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig

            config = Int8DynamicActivationInt8WeightConfig()
            quantize, kernel = (lambda _name, w: _quant.torchao_weight(w, config)), "torchao int8 dynamic"
        choice = _quant.choose_linears(model, cfg.skip_blocks, cfg.skip_io)
        key = _quant.model_key(model, cfg.skip_blocks, cfg.skip_io)
        return attach_quantized(self.spec.name, backend, plan, choice, key,
                                lambda: _quant.quantize_layers(choice.targets, quantize), {"kernel": kernel})
