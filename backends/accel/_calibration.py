"""Per-model calibration of the DiT caches: TeaCache's rescale curve, MagCache's ratios,
and the threshold that gives a target skip rate.

A published TeaCache polynomial or MagCache curve describes one checkpoint and schedule;
for any other model they are a guess. The fits here measure the model itself, on a few
calibration requests, with the model run as it is served (``backend.pipe``):

- ``fit_rescale_curve``: TeaCache's own procedure. Run without skipping; per step and
  CFG branch record the relative L1 change of the first block's timestep-modulated input
  (what TeaCache measures) and of the block stack's residual (what the skip would get
  wrong), then ``numpy.polyfit(input_change, output_change, 4)``.
- ``record_mag_ratios``: MagCache's calibration pass (``mag_cache.calibrate_mag_ratios``)
  averaged over the requests.
- ``choose_threshold``: bisection over a method's threshold until the share of skipped
  (or partly skipped) denoiser calls on the requests is the target, read from the
  method's own stats (the cost meter's full and partial evaluations).

How a stored calibration reaches a run: the studio keeps them (its history database) and,
once a request is validated, puts the records for each method's model on that method's
``MethodChoice.calibrations``; ``instantiate`` hands them to the method object, which picks
the one matching its final run plan (``plan_settings``: steps, size, frames, scheduler).
So a calibration travels with the request to whichever executor runs it (in-process or
a Ray worker) and no method imports studio code. A method that measures a calibration
during a run (MagCache's first run) reports it in its stats under ``"calibration"`` for
the studio to keep.
"""

from __future__ import annotations

import statistics
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from backends.plan import DiffusionPlan, tracking_branches
from backends.types import MethodChoice, Request, ValidationError

RESCALE, RATIOS, THRESHOLD = "rescale", "ratios", "threshold"  # calibration kinds
CURVE_DEGREE = 4  # TeaCache's polynomial degree
SKIP_RATE_METHODS = ("teacache", "first_block_cache")


def plan_settings(backend, plan: DiffusionPlan) -> dict[str, Any]:
    """What a calibration curve depends on besides the model: the step count, the size
    (and frames), the scheduler and the denoiser passes per step."""
    kwargs = plan.kwargs
    settings = {"steps": int(plan.steps), "height": kwargs.get("height"), "width": kwargs.get("width"),
                "scheduler": type(backend.pipe.scheduler).__name__, "passes": int(plan.guidance.passes)}
    if kwargs.get("num_frames"):
        settings["frames"] = int(kwargs["num_frames"])
    return settings


def calibration_call(backend, plan: DiffusionPlan) -> dict[str, Any]:
    """The pipeline call of an untimed calibration pass inside ``attach``: the run's own
    arguments, a copy of its seeded generator (the timed run still draws the same noise)
    and latent output (no decode)."""
    run = {**plan.kwargs, "num_inference_steps": plan.steps}
    generator = plan.kwargs.get("generator")
    if isinstance(generator, torch.Generator):
        run["generator"] = torch.Generator(generator.device).set_state(generator.get_state())
    if "output_type" in backend.call_params:
        run["output_type"] = "latent"
    return run


def matching_calibration(records: Iterable[dict[str, Any]], kind: str, settings: dict[str, Any],
                         exact: bool = True) -> dict[str, Any] | None:
    """The newest record of ``kind`` made with exactly ``settings``; with ``exact=False``,
    failing that, the newest of ``kind`` at any settings (a TeaCache curve maps input
    change to output change and carries over between step counts and sizes; TeaCache
    itself ships one polynomial per model). Records come newest first."""
    records = [r for r in records if r.get("kind") == kind]
    for record in records:
        if record.get("settings") == settings:
            return record
    return records[0] if records and not exact else None


def rel_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    return ((current - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12)).item()


def _plain(request: Request) -> Request:
    return request.replace(methods=[])


def record_changes(backend, request: Request, cancel: Any = None) -> tuple[list[float], list[float], dict[str, Any]]:
    """One run without skipping: per step after the first and per CFG branch, the relative
    L1 change of the modulated input and of the block stack's residual; and the run's
    settings."""
    from backends.accel._block_span import block_lists, block_metadata
    from backends.accel.teacache import modulated_input

    blocks = [block for _, block in block_lists(backend.denoiser)]
    if not blocks:
        raise ValidationError(f"calibration found no transformer block list in {type(backend.denoiser).__name__}")
    head_meta, tail_meta = block_metadata(blocks[0], "teacache"), block_metadata(blocks[-1], "teacache")
    seen: dict[str, dict[str, Any]] = {}
    xs: list[float] = []
    ys: list[float] = []
    holder: dict[str, DiffusionPlan] = {}

    def branch() -> dict[str, Any]:
        plan = holder.get("plan")
        name = (plan.guidance.branch if plan is not None else None) or "default"
        return seen.setdefault(name, {})

    def head(module, args, kwargs):
        state = branch()
        state["input"] = head_meta._get_parameter_from_args_kwargs(head_meta.hidden_states_argument_name, args, kwargs)
        current = modulated_input(module, args, kwargs).float()
        previous, state["modulated"] = state.get("modulated"), current
        state["x"] = rel_l1(current, previous) if previous is not None and previous.shape == current.shape else None

    def tail(_module, _args, _kwargs, output):
        state = branch()
        out = output[tail_meta.return_hidden_states_index] if isinstance(output, tuple) else output
        residual = (out[:, -state["input"].shape[1]:] - state["input"]).float()
        previous, state["residual"] = state.get("residual"), residual
        if state.get("x") is not None and previous is not None and previous.shape == residual.shape:
            xs.append(state["x"])
            ys.append(rel_l1(residual, previous))

    plan = backend.build_plan(_plain(request))
    holder["plan"] = plan
    run = backend.pipeline_kwargs(plan)
    if "output_type" in backend.call_params:
        run["output_type"] = "latent"
    with backend.lock:  # hooked only while no other run can use the shared model: none of its steps feed the curve
        handles = [blocks[0].register_forward_pre_hook(head, with_kwargs=True),
                   blocks[-1].register_forward_hook(tail, with_kwargs=True), *stop_hooks(backend, cancel)]
        try:
            with torch.no_grad(), tracking_branches(backend.denoiser, plan.guidance):
                backend.pipe(**run)
        finally:
            for handle in handles:
                handle.remove()
    return xs, ys, plan_settings(backend, plan)


def stop_hooks(backend, cancel: Any) -> list:
    """A pass run straight on the pipeline (not through ``backend.run``) still stops when
    ``cancel`` (a CancelToken: cancelled or past its time limit) says so: checked before
    every denoiser evaluation, as ``backend.run`` does."""
    if cancel is None:
        return []
    cancel.start()
    return [backend.denoiser.register_forward_pre_hook(cancel.check_hook)]


def fit_rescale_curve(backend, requests: Sequence[Request], degree: int = CURVE_DEGREE,
                      cancel: Any = None) -> dict[str, Any]:
    """TeaCache's rescale polynomial for this model: ``polyfit(input_change,
    output_change, degree)`` over every step of every request (highest power first, the
    order ``teacache.rescale`` reads). Returns the coefficients, the points it was fitted
    on (for the plot) and the settings of the first request."""
    if not requests:
        raise ValidationError("calibration needs at least one prompt")
    xs: list[float] = []
    ys: list[float] = []
    settings: dict[str, Any] = {}
    for request in requests:
        x, y, settings = record_changes(backend, request, cancel)
        xs += x
        ys += y
    if len(xs) <= degree:
        raise ValidationError(f"calibration recorded {len(xs)} step changes; a degree-{degree} fit needs more "
                              "(use more steps or prompts)")
    coefficients = np.polyfit(np.asarray(xs), np.asarray(ys), degree)
    return {"kind": RESCALE, "coefficients": [float(c) for c in coefficients], "points": [xs, ys],
            "r2": fit_r2(xs, ys, coefficients), "settings": settings, "prompts": len(requests)}


def fit_r2(xs: Sequence[float], ys: Sequence[float], coefficients: Sequence[float]) -> float:
    """How much of the output change the curve explains (1 = all of it, 0 = no better than
    its mean): a low value says the input change is a poor signal on this model, so no
    rescaling can make TeaCache skip the right steps."""
    ys_arr = np.asarray(ys, dtype=np.float64)
    spread = float(((ys_arr - ys_arr.mean()) ** 2).sum())
    if spread == 0.0:
        return 1.0
    residual = float(((ys_arr - np.polyval(np.asarray(coefficients), np.asarray(xs))) ** 2).sum())
    return round(1.0 - residual / spread, 4)


def record_mag_ratios(backend, requests: Sequence[Request], cancel: Any = None) -> dict[str, Any]:
    """MagCache's calibration pass on each request, the ratios averaged per step."""
    from backends.accel.mag_cache import calibrate_mag_ratios

    if not requests:
        raise ValidationError("calibration needs at least one prompt")
    curves, settings = [], {}
    for request in requests:
        plan = backend.build_plan(_plain(request))
        with backend.lock:
            hooks = stop_hooks(backend, cancel)
            try:
                curves.append(calibrate_mag_ratios(backend, plan))
            finally:
                for hook in hooks:
                    hook.remove()
        settings = plan_settings(backend, plan)
    ratios = [float(statistics.mean(values)) for values in zip(*curves)]
    return {"kind": RATIOS, "ratios": ratios, "settings": settings, "prompts": len(requests)}


def skip_rate(stats: dict[str, Any]) -> float:
    """Share of the denoiser calls a method answered in whole or in part from its cache
    (the cost meter's partial evaluations; TeaCache and FirstBlockCache meter both)."""
    full, partial = stats.get("evals_full", 0) or 0, stats.get("evals_partial", 0) or 0
    return partial / (full + partial) if full + partial else 0.0


def measured_skip_rate(backend, requests: Sequence[Request], method: str, params: dict[str, Any],
                       calibrations: list[dict[str, Any]] | None = None, cancel: Any = None) -> float:
    """The mean skip rate of ``method`` with ``params`` over ``requests`` (real runs)."""
    from backends.accel.base import get_method

    spec = get_method(method).spec
    values = spec.validate(params)
    rates = []
    for request in requests:
        choice = MethodChoice(method, values, config=spec.build(values), calibrations=list(calibrations or []))
        result = backend.run(request.replace(methods=[choice]), cancel=cancel)
        rates.append(skip_rate(result.method_stats.get(method, {})))
    return float(statistics.mean(rates))


def choose_threshold(backend, requests: Sequence[Request], method: str, target: float,
                     params: dict[str, Any] | None = None, calibrations: list[dict[str, Any]] | None = None,
                     iterations: int = 8, cancel: Any = None) -> dict[str, Any]:
    """Bisection over ``method``'s threshold for the skip rate ``target`` (0-1) on
    ``requests``: the skip rate rises with the threshold, so each probe halves the
    interval. Returns the threshold whose measured rate came closest, its rate and every
    probe (threshold, rate)."""
    from backends.accel.base import get_method

    if method not in SKIP_RATE_METHODS:
        raise ValidationError(f"a target skip rate applies to {' and '.join(SKIP_RATE_METHODS)}, not {method}")
    if not 0.0 < target < 1.0:
        raise ValidationError("the target skip rate must be between 0 and 1 (e.g. 0.5 for half the steps)")
    param = get_method(method).spec.param("threshold")
    low, high = float(param.min or 0.0), float(param.max or 1.0)
    params = {k: v for k, v in (params or {}).items() if k != "threshold"}
    probes: list[tuple[float, float]] = []
    for _ in range(iterations):
        middle = (low + high) / 2
        rate = measured_skip_rate(backend, requests, method, {**params, "threshold": round(middle, 6)}, calibrations,
                                  cancel)
        probes.append((round(middle, 6), rate))
        if abs(rate - target) < 1e-9:
            break
        low, high = (middle, high) if rate < target else (low, middle)
    best = min(probes, key=lambda p: (abs(p[1] - target), p[0]))
    first = next(iter(requests))
    settings = plan_settings(backend, backend.build_plan(_plain(first)))
    return {"kind": THRESHOLD, "threshold": best[0], "skip_rate": best[1], "target": target, "probes": probes,
            "params": params, "settings": settings, "prompts": len(requests)}


def calibration_requests(modality: str, model: str, prompts: Sequence[str], params: dict[str, Any] | None = None,
                         seed: int = 0) -> list[Request]:
    """The calibration runs: one request per prompt, seeds ``seed``, ``seed + 1``..."""
    return [Request(modality, model, prompt, seed=seed + i, params=dict(params or {}))
            for i, prompt in enumerate(prompts)]
