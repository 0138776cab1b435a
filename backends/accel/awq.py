"""AWQ: activation-aware weight quantization to int4 (Lin et al., MLSys 2024).

A few input channels of each Linear carry much larger activations than the rest; the
weights that multiply them matter most, and plain int4 rounds them as coarsely as any
other. AWQ scales input channel j of the weight up by s_j before quantizing and the input
down by 1/s_j at run time (the product is unchanged in exact arithmetic), so the salient
channels get finer quantization steps. With s = mean|x|^alpha (normalised so
sqrt(max * min) = 1) and alpha chosen on a grid per layer by the output error of the
quantized layer on calibration activations, alpha = 0 (plain int4) is always a
candidate: on the calibration data AWQ can only match or beat plain int4.

This implementation (after the authors' ``auto_scale``, mit-han-lab/llm-awq): the
calibration activations are the inputs each Linear sees in the full-precision model on
``calib_tokens`` tokens of training-split text; the search is per Linear (the paper groups
layers sharing an input and scores the block output); 1/s is applied as an input scale of
the int4 weight (``_quant.Int4Weight.act_pre_scale``, one multiply) rather than folded
into the preceding norm, so every Linear keeps its own scales and nothing else changes.
Then, as the paper's code does, a clipping ratio per weight group is searched on the same
activations (``search_clip``).
"""

from __future__ import annotations

from typing import Any

import torch

from backends.accel import _quant
from backends.accel.base import Limits, Method, MethodConfig, MethodSpec, param, register
from backends.accel.weight_quant import WEIGHT_SLOT, attach_quantized, denoiser_of, skip_blocks_limits
from backends.plan import RunHandle, RunPlan
from backends.types import ValidationError


class AWQConfig(MethodConfig):
    group_size: int = param(64, choices=(32, 64, 128, 256), help="inputs sharing one int4 scale and offset",
                            paper=128)
    grid: int = param(20, min=2, max=50, help="alpha values tried per layer, evenly spaced in [0, 1)")
    calib_tokens: int = param(2048, min=256, max=16384, step=256,
                              help="calibration tokens (training-split text of the code corpus)", paper=65536)
    clip: bool = param(True, help="search a clipping range per weight group after scaling (AWQ's auto_clip)")
    skip_blocks: int = param(1, min=0, max=4,
                             help="keep the first and last N blocks in full precision (the sensitive ones)")
    skip_io: bool = param(True, help="keep the output head (and any layer outside the blocks) in full precision")


def awq_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha, normalised so that sqrt(max(s) * min(s)) = 1 (as the paper's code)."""
    s = x_mean.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def search_scale(weight: torch.Tensor, x: torch.Tensor, group_size: int,
                 grid: int) -> tuple[torch.Tensor, float, float]:
    """The per-input-channel scale (grid over alpha) minimising ||x W^T - (x/s) Q(W s)^T||^2
    on the calibration rows ``x``; returns (s, best alpha, error of alpha = 0 / best error)."""
    w, x = weight.float(), x.float()
    reference = x @ w.t()
    x_mean = x.abs().mean(0)
    best = (None, 0.0, float("inf"))
    plain = None
    for i in range(grid):
        alpha = i / grid
        s = awq_scales(x_mean, alpha)
        out = (x / s) @ _quant.fake_int4(w * s, group_size).t()
        err = (out - reference).pow(2).mean().item()
        if i == 0:
            plain = err
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], (plain / best[2]) if best[2] > 0 else 1.0


def search_clip(weight: torch.Tensor, x: torch.Tensor, group_size: int, grid: int = 20,
                max_shrink: float = 0.5, rows: int = 256) -> torch.Tensor:
    """Per (output row, group), the fraction of the group's range to keep before int4
    rounding (1.0 = min-max) that minimises that group's share of the output error on
    ``x``: clipping a few outlying weights buys finer steps for the rest (AWQ's
    ``auto_clip``). Returns [n, k / group_size]."""
    w, x = weight.float(), x.float()[torch.linspace(0, len(x) - 1, min(rows, len(x))).long()]
    n, k = w.shape
    xg = x.reshape(len(x), k // group_size, group_size)
    best_err = torch.full((n, k // group_size), float("inf"))
    best = torch.ones(n, k // group_size)
    for i in range(grid):
        ratio = 1 - max_shrink * i / grid
        clip = torch.full((n, k // group_size), ratio)
        delta = (w - _quant.fake_int4(w, group_size, clip)).reshape(n, k // group_size, group_size)
        err = torch.einsum("rgk,ngk->rng", xg, delta).pow(2).mean(0)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, clip, best)
    return best


@torch.no_grad()
def calibration_inputs(model: torch.nn.Module, targets: dict[str, torch.nn.Linear], ids: torch.Tensor,
                       context: int, rows: int = 1024) -> dict[str, torch.Tensor]:
    """The inputs each target Linear sees on ``ids`` (``rows`` of them kept, evenly spaced)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in targets}

    def keep(name: str, x: torch.Tensor) -> None:  # subsampled in the hook: all rows of all layers add up
        flat = x.reshape(-1, x.shape[-1])
        picked = torch.linspace(0, len(flat) - 1, min(rows, len(flat)), device=flat.device).long()
        seen[name].append(flat[picked].detach().float())

    hooks = [module.register_forward_pre_hook(lambda _m, args, name=name: keep(name, args[0]))
             for name, module in targets.items()]
    device = next(model.parameters()).device
    try:
        windows = max(1, (len(ids) - 1) // context)
        batch = torch.stack([ids[r * context: (r + 1) * context] for r in range(windows)]).to(device)
        model(input_ids=batch)  # one forward: each hook runs once
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat(chunks) for name, chunks in seen.items()}


@register
class AWQMethod(Method):
    spec = MethodSpec(
        name="awq",
        title="AWQ (activation-aware int4)",
        modalities=("text",),
        families=("causal-lm",),
        summary="int4 group-wise weights after scaling the input channels with large activations up "
                "(scales searched per layer on calibration text); the original weights come back on removal.",
        paper="Lin et al. 2024, AWQ: Activation-aware Weight Quantization for LLM Compression and "
              "Acceleration (MLSys)",
        lossless=False,
        config=AWQConfig,
        slots=(WEIGHT_SLOT,),
        defaults_note="group size 64 (paper 128: the bundled model is 256 wide) and 2,048 calibration tokens "
                      "(paper: 128 x 512 of the Pile) so calibration takes seconds on CPU",
    )

    @classmethod
    def limits(cls, backend) -> Limits:
        return skip_blocks_limits(backend, int(cls.spec.param("skip_blocks").max),
                                  cls.spec.param("group_size").choices)

    def attach(self, backend, plan: RunPlan) -> RunHandle:
        from backends.text_eval import CONTEXT, calibration_ids

        cfg = self.config
        model = denoiser_of(backend)
        tokenizer = getattr(backend, "tokenizer", None)
        if tokenizer is None:
            raise ValidationError("awq needs the model's tokenizer for its calibration text")
        choice = _quant.choose_linears(model, cfg.skip_blocks, cfg.skip_io,
                                       lambda m: _quant.int4_fits(m, cfg.group_size))
        search: dict[str, Any] = {"alphas": {}, "plain_over_awq_error": {}}

        def build_all() -> dict[str, torch.Tensor]:
            ids = calibration_ids(tokenizer, cfg.calib_tokens)
            context = min(CONTEXT, getattr(model.config, "max_position_embeddings", CONTEXT))
            inputs = calibration_inputs(model, choice.targets, ids, context)
            weights = {}
            for name, module in choice.targets.items():
                s, alpha, gain = search_scale(module.weight, inputs[name], cfg.group_size, cfg.grid)
                scaled = module.weight.float() * s
                clip = search_clip(scaled, inputs[name] / s, cfg.group_size) if cfg.clip else None
                weights[name] = torch.nn.Parameter(
                    _quant.int4_weight(scaled.to(module.weight.dtype), cfg.group_size, 1 / s, clip),
                    requires_grad=False)
                search["alphas"][name], search["plain_over_awq_error"][name] = alpha, gain
            weights["__search__"] = search  # kept with the weights: a cached toggle reports it too
            return weights

        key = _quant.model_key(model, cfg.group_size, cfg.grid, cfg.calib_tokens, cfg.clip, cfg.skip_blocks,
                               cfg.skip_io)  # every field that changes the weights
        kernel = "int4 packed, dequantized per matmul"

        def figures(weights: dict[str, Any]) -> dict[str, Any]:
            found = weights["__search__"]
            alphas, gains = list(found["alphas"].values()), list(found["plain_over_awq_error"].values())
            return {"weights": "int4", "kernel": kernel,
                    "mean_alpha": round(sum(alphas) / len(alphas), 3) if alphas else None,
                    "calib_error_plain_over_awq": round(sum(gains) / len(gains), 3) if gains else None}

        return attach_quantized(self.spec.name, backend, plan, choice, key, build_all, figures)
