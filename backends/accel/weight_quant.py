"""Weight-only quantization of the denoiser or language model: int8, int4 or fp8 weights,
activations left in floating point.

Every ``nn.Linear`` outside the skip list gets a quantized weight (torchao ``quantize_``
configs for int8 and fp8: per-row int8 with a float scale, Jacob et al. 2018 / torchao;
group-wise asymmetric int4 with a scale and offset per ``group_size`` inputs, as GPTQ and
AWQ store it). Fewer weight bytes move through memory per matmul, which is what a
memory-bound decode step waits on (int8: torchao's weight-only kernel).

int4 is a documented fallback: torchao 0.18's ``Int4WeightOnlyConfig`` needs the mslk
package (GPU) or a CUDA bfloat16 tinygemm layout and has no CPU kernel left, and torch's
own CPU int4 kernel is far slower than a dense matmul here (``_quant.Int4Weight``), so int4
weights are stored packed (half a byte a value) and dequantized at each matmul: the
memory saving (weights about 6x smaller), not a speed-up.

The skip list keeps the layers quantization hurts most in full precision: the I/O layers
(embeddings, output head, in/out projections, time and text embedders) and the first and
last blocks (ViDiT-Q and LLM.int8 report these as the sensitive ones).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from backends.accel import _quant
from backends.accel.base import Limits, Method, MethodConfig, MethodSpec, param, register
from backends.plan import RunHandle, RunPlan
from backends.types import ValidationError

WEIGHT_FAMILIES = ("unet", "dit", "video-dit", "video-unet", "audio-unet", "audio-dit", "causal-lm", "codec-lm", "tts")
WEIGHT_SLOT = "weights"  # one weight format per run: weight_quant, dynamic_quant and awq share it


class WeightQuantConfig(MethodConfig):
    weights: str = param("int8", choices=("int8", "int4", "fp8"),
                         help="int8: per-row int8 (torchao); int4: group-wise int4, dequantized per matmul (memory, "
                              "not speed); "
                              "fp8: float8 e4m3 (torchao, a GPU of compute capability 8.9 or newer)")
    group_size: int = param(64, choices=(32, 64, 128, 256),
                            help="int4 only: inputs sharing one scale and offset (smaller: more accurate, "
                                 "more bytes)", paper=128)
    skip_blocks: int = param(1, min=0, max=4,
                             help="keep the first and last N blocks in full precision (the sensitive ones)")
    skip_io: bool = param(True, help="keep layers outside the blocks in full precision: embeddings, output "
                                     "head, in/out projections, time and text embedders")


def denoiser_of(backend: Any) -> torch.nn.Module:
    model = backend.denoiser
    if not isinstance(model, torch.nn.Module):
        raise ValidationError("this model has no network to quantize")
    return model


def skip_blocks_limits(backend: Any, most: int, group_sizes: tuple[int, ...] = ()) -> Limits:
    """For the search: ``skip_blocks`` up to the largest count that still leaves a layer
    to quantize with the I/O layers kept (dummy-llama's 2 layers: 0), and the int4
    ``group_sizes`` that still find a layer of whole groups at that count. Search-only:
    with ``skip_io`` off, a longer skip list still leaves the I/O layers, so it is not
    refused (the attach refuses a list that leaves nothing)."""
    model = getattr(backend, "denoiser", None)
    if not isinstance(model, torch.nn.Module):
        return Limits(unfit="this model has no network to quantize")
    deepest = max((k for k in range(most + 1) if _quant.choose_linears(model, k, True).targets), default=0)
    groups = tuple(g for g in group_sizes
                   if _quant.choose_linears(model, deepest, True, lambda m, g=g: _quant.int4_fits(m, g)).targets)
    return Limits(search_ranges={"skip_blocks": (None, deepest)},
                  search_choices={"group_size": groups} if group_sizes else {})


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def torchao_config(weights: str) -> Any:
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return Int8WeightOnlyConfig() if weights == "int8" else Float8WeightOnlyConfig()


def publish_weights_tag(handle: RunHandle, backend: Any, tag: str) -> None:
    """Name the weights the backend runs while ``handle`` is attached (``backend.weights_tag``,
    the method and its cache key, which holds every config field that changes the weights):
    what the model computes depends on it, so state kept across runs (the prefix cache's
    K/V) is keyed by it. Restored on removal."""
    previous = getattr(backend, "weights_tag", "")
    handle.on_remove(setattr, backend, "weights_tag", previous)
    backend.weights_tag = tag


def attach_quantized(method: str, backend: Any, plan: RunPlan, choice: _quant.LayerChoice, key: tuple,
                     build: Callable[[], dict[str, Any]],
                     extra: Callable[[dict[str, Any]], dict[str, Any]] | dict[str, Any] | None = None) -> RunHandle:
    """Swap the quantized weights of ``choice`` in (``build`` runs once per model and
    ``key``; later runs take them from the cache) and return the handle that swaps the
    originals back. ``extra``: more stats, or a function of the built weights giving them."""
    model = denoiser_of(backend)
    if not choice.targets:
        raise ValidationError(f"{method}: the skip list leaves no layer to quantize in this model")
    before = _quant.module_weight_bytes(model)
    with torch.no_grad():
        weights, cached = _quant.CACHE.get(model, (method, *key), build)
    figures = extra(weights) if callable(extra) else dict(extra or {})
    stats: dict[str, Any] = {}
    handle = RunHandle(plan, lambda: dict(stats))
    with handle.undo_on_error():
        _quant.swap_weights(handle, choice.targets, weights)
        publish_weights_tag(handle, backend, f"{method}{key!r}")
    stats.update(_quant.quant_stats(model, choice, before, cached), **figures)  # bytes as run: after the swap
    return handle


@register
class WeightQuantMethod(Method):
    spec = MethodSpec(
        name="weight_quant",
        title="Weight-only quantization (int8 / int4 / fp8)",
        modalities=("image", "video", "audio", "text"),
        families=WEIGHT_FAMILIES,
        summary="Store the network's Linear weights in int8, int4 or fp8 (torchao); sensitive layers stay in "
                "full precision. Fewer weight bytes per matmul; the original weights come back on removal.",
        paper="Jacob et al. 2018, Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-"
              "Only Inference (CVPR); torchao (PyTorch 2024); Zhao et al. 2024, ViDiT-Q (sensitive layers kept)",
        lossless=False,
        config=WeightQuantConfig,
        slots=(WEIGHT_SLOT,),
        defaults_note="int4 group size 64 rather than 128: the bundled models are 256 wide, where 128-wide "
                      "groups lose more accuracy",
    )

    @classmethod
    def limits(cls, backend) -> Limits:
        """skip_blocks within the model's depth; fp8 only on a GPU that has it."""
        limits = skip_blocks_limits(backend, int(cls.spec.param("skip_blocks").max),
                                    cls.spec.param("group_size").choices)
        if limits.unfit:
            return limits
        device = next(backend.denoiser.parameters()).device
        weights = tuple(w for w in cls.spec.param("weights").choices if w != "fp8" or fp8_supported(device))
        # search-only: the attach refuses fp8 on this device with the reason
        return dataclasses.replace(limits, search_choices={**limits.search_choices, "weights": weights})

    def attach(self, backend, plan: RunPlan) -> RunHandle:
        cfg = self.config
        model = denoiser_of(backend)
        device = next(model.parameters()).device
        if cfg.weights == "fp8" and not fp8_supported(device):
            raise ValidationError("fp8 weights need a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper)")
        if cfg.weights == "int4":
            fits = lambda m: _quant.int4_fits(m, cfg.group_size)  # noqa: E731
            quantize = lambda _name, w: _quant.int4_weight(w, cfg.group_size)  # noqa: E731
        else:
            fits = lambda m: True  # noqa: E731
            config = torchao_config(cfg.weights)
            quantize = lambda _name, w: _quant.torchao_weight(w, config)  # noqa: E731
        choice = _quant.choose_linears(model, cfg.skip_blocks, cfg.skip_io, fits)
        key = _quant.model_key(model, cfg.weights, cfg.group_size if cfg.weights == "int4" else 0,
                               cfg.skip_blocks, cfg.skip_io)
        kernel = {"int8": "torchao int8 weight-only", "fp8": "torchao float8 weight-only",
                  "int4": "int4 packed, dequantized per matmul"}
        return attach_quantized(self.spec.name, backend, plan, choice, key,
                                lambda: _quant.quantize_layers(choice.targets, quantize),
                                {"weights": cfg.weights, "kernel": kernel[cfg.weights]})
