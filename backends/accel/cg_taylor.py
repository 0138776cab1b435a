"""CG-Taylor (confidence-gated Taylor forecasting; seed paper 205: "last-block Taylor
forecast gated by first-block forecast error", 3.17x FLUX, 4.14x Wan).

TaylorSeer forecasts features on a fixed schedule; First Block Cache decides from the first
block's output whether to skip the rest, and then reuses a stale residual. CG-Taylor joins
them: the first block always runs, and its output is also *forecast* by a Taylor expansion
over the last computed steps. When that forecast is accurate (relative error under
``threshold``), the trajectory is smooth enough that a forecast of the rest of the stack can
be trusted too: the remaining blocks are skipped and their residual (output of the last
block minus input of the second) comes from the same kind of forecast. When the first
block's forecast misses, the step is computed and both forecasts take its values.

Mechanics: a ``SpanCache`` over every block after the first (``backends.accel._block_span``)
with this module's decision function, which keeps per CFG branch the Taylor factors
(finite differences in the step index) of the first block's output and of the span's
residual, and puts the forecast residual in place before a skipped step.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from backends.accel._block_span import SpanCache, block_lists, block_metadata, span_handle
from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.plan import DiffusionPlan, RunHandle
from backends.types import ValidationError


class CGTaylorConfig(MethodConfig):
    threshold: float = param(0.05, min=0.0, max=1.0, step=0.01,
                             help="relative error of the first block's forecast under which the rest of the "
                                  "stack is forecast instead of computed; higher = faster and rougher")
    max_order: int = param(1, min=0, max=3, paper=2,
                           help="Taylor order of both forecasts (0 = plain reuse, 1 = linear, 2 = the paper's)")
    warmup_steps: int = param(2, min=1, max=50, help="first steps always computed (the forecast needs history)")
    max_skips: int = param(3, min=1, max=20, help="at most this many forecast steps in a row")


class TaylorSeries:
    """Taylor factors of a tensor-valued function of the step index, from its values at the
    computed steps: ``factors[k]`` estimates the k-th derivative by divided differences."""

    def __init__(self, order: int) -> None:
        self.order = order
        self.factors: list[Any] = []
        self.step: int | None = None

    def update(self, step: int, value: Any) -> None:
        new = [value]
        if self.step is not None and step > self.step:
            gap = step - self.step
            for k in range(min(self.order, len(self.factors))):
                new.append(_map(lambda a, b: (a - b) / gap, new[k], self.factors[k]))
        self.factors, self.step = new, step

    @property
    def ready(self) -> bool:
        """Enough history for the configured order (order 0 needs one computed step)."""
        return self.step is not None and len(self.factors) == self.order + 1

    def forecast(self, step: int) -> Any:
        offset = step - self.step
        out = self.factors[0]
        for k in range(1, len(self.factors)):
            coef = offset ** k / math.factorial(k)
            out = _map(lambda acc, f: acc + coef * f, out, self.factors[k])
        return out


def _map(fn, a, b):
    """``fn`` over a tensor or a (hidden, encoder) pair whose encoder part may be None."""
    if isinstance(a, tuple):
        return tuple(None if x is None else fn(x, y) for x, y in zip(a, b))
    return fn(a, b)


def relative_error(actual: torch.Tensor, forecast: torch.Tensor) -> float:
    return ((actual - forecast).abs().mean() / actual.abs().mean().clamp_min(1e-12)).item()


def apply_cg_taylor(denoiser, config: CGTaylorConfig, num_steps: int = 0) -> SpanCache:
    """Hook every block after the first; returns the handle whose ``remove()`` undoes it.
    The last of ``num_steps`` steps is always computed."""
    blocks = [block for _, block in block_lists(denoiser)]
    if len(blocks) < 2:
        raise ValidationError("cg_taylor needs at least two transformer blocks (one to gate, one to forecast)")
    meta = block_metadata(blocks[1], "cg_taylor")

    def decide(_module, args, kwargs, state) -> bool:
        ex = state.extra
        first = ex.setdefault("first", TaylorSeries(config.max_order))
        rest = ex.setdefault("rest", TaylorSeries(config.max_order))
        step = state.calls
        if ex.get("pending") is not None and not state.reuse and state.residuals is not None:
            computed_step, first_out = ex.pop("pending")  # the step the span last computed
            first.update(computed_step, first_out)
            rest.update(computed_step, state.residuals)
        with torch.no_grad():
            first_out = meta._get_parameter_from_args_kwargs(meta.hidden_states_argument_name, args, kwargs)
        last = num_steps > 0 and step >= num_steps - 1
        can_skip = (step >= config.warmup_steps and not last and first.ready and rest.ready
                    and ex.get("skips", 0) < config.max_skips)
        if can_skip:
            error = relative_error(first_out, first.forecast(step))
            ex["last_error"] = error
            if error < config.threshold:
                state.residuals = rest.forecast(step)
                ex["skips"] = ex.get("skips", 0) + 1
                return True
        ex["skips"] = 0
        ex["pending"] = (step, first_out.detach())
        return False

    return SpanCache(denoiser, blocks[1:], decide, "cg_taylor")


@register
class CGTaylorMethod(Method):
    spec = MethodSpec(
        name="cg_taylor",
        title="CG-Taylor (confidence-gated Taylor forecast)",
        modalities=("image", "video"),
        families=("dit", "video-dit"),
        summary="Run the first block and forecast its output by a Taylor expansion; when that forecast is "
                "accurate, forecast the rest of the stack's residual too instead of computing it.",
        paper="Confidence-Gated Taylor forecasting for diffusion transformers (seed 205: 3.17x FLUX, 4.14x Wan)",
        lossless=False,
        config=CGTaylorConfig,
        slots=("dit-cache",),
    )

    def attach(self, backend, plan: DiffusionPlan) -> RunHandle:
        if len(block_lists(backend.denoiser)) < 2:
            raise ValidationError("cg_taylor needs a transformer with at least two blocks")
        cache = apply_cg_taylor(backend.denoiser, self.config, num_steps=plan.steps)
        # the first block still runs on a forecast step: a partial evaluation, not a skipped one
        return span_handle(plan, cache, lambda: {}, self.notes, whole_stack=False)

    def notes(self, plan: DiffusionPlan) -> list[str]:
        if self.config.threshold <= 0:
            return ["cg_taylor with threshold 0 never forecasts: no speed-up"]
        if plan.steps <= self.config.warmup_steps + self.config.max_order + 1:
            return [f"cg_taylor: {plan.steps} steps leave no step after the warm-up and the history "
                    "the forecast needs"]
        return []
