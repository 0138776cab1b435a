"""BAC, block-wise adaptive caching (Ji et al. 2025, "Block-wise Adaptive Caching for
Accelerating Diffusion Policy"; seed 138: up to 3x, lossless).

The features of a transformer's sub-blocks (attention, feed-forward) change at different
rates across the denoising steps, and not uniformly in time. BAC gives every sub-block its
own set of update steps; in between, the sub-block's output is the one cached at its last
update. Two parts:

- Adaptive Caching Scheduler: one calibration pass records each sub-block's output at every
  step; ``S[i, j]`` is the cosine similarity of its outputs at steps i and j. With a budget
  of ``M`` updates (step 0 always one), dynamic programming picks the update steps that
  maximise the summed similarity between each skipped step's true feature and the cached
  one it is answered with.
- Bubbling Union: caching errors grow when they pass through feed-forward blocks. The
  ``bubble_top_k`` feed-forward sub-blocks with the most volatile features (mean pairwise
  L1 distance of their outputs across steps, relative to their size) also update at every
  step a feed-forward block downstream of them updates, so a downstream FFN never
  recomputes on a stale upstream error.

Sub-blocks here: in every transformer block (FLUX's dual- and single-stream blocks, Wan's
blocks, the UNet's ``BasicTransformerBlock`` s) the attention layers and the feed-forward
(FLUX single blocks: ``proj_mlp``, the MLP's expanding half; its ``proj_out`` mixes
attention and MLP and always runs). Each CFG branch keeps its own cached outputs.

Calibration: the first run for a model, step count, size and scheduler runs one extra,
untimed pass without caching (MagCache does the same), kept in this process and reported
in the run's stats under ``"calibration"`` (kind ``"similarity"``) for the studio to keep;
later requests bring it back (``backends.accel._calibration``). Neither diffusers 0.42 nor
cache-dit implements BAC, so this is ours.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import torch

from backends.accel._block_span import block_lists
from backends.accel._calibration import calibration_call, matching_calibration, plan_settings
from backends.accel._eval_cost import EvalCostMeter
from backends.accel._patch import ForwardPatch
from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.plan import UNCOND, DiffusionPlan, RunHandle, require_from_noise, tracking_branches
from backends.types import ValidationError

SIMILARITY = "similarity"  # calibration kind
ATTENTION_NAMES = ("attn", "attn1", "attn2")
FFN_NAMES = ("ff", "ff_context", "ffn", "proj_mlp")


class BACConfig(MethodConfig):
    update_ratio: float = param(0.33, min=0.05, max=1.0, step=0.01,
                                help="updates per sub-block as a share of the steps (budget M; 0.33 ~ the "
                                     "paper's 3x); lower = faster and rougher")
    bubble_top_k: int = param(2, min=0, max=100,
                              help="most volatile feed-forward sub-blocks that also update whenever a "
                                   "downstream feed-forward does (Bubbling Union); 0 = off")


# ----------------------------------------------------------------------------- the scheduler


def similarity_matrix(features: torch.Tensor) -> np.ndarray:
    """``features`` [T, D] -> cosine similarity [T, T]."""
    unit = torch.nn.functional.normalize(features.float(), dim=1)
    return (unit @ unit.T).numpy().astype(np.float64)


def volatility(features: torch.Tensor) -> float:
    """Mean pairwise L1 distance of the step features, over their mean magnitude."""
    f = features.float()
    distance = torch.cdist(f, f, p=1).mean() / f.shape[1]
    return float(distance / f.abs().mean().clamp_min(1e-12))


def hold_gain(sim: np.ndarray) -> np.ndarray:
    """``gain[i, j]``: summed similarity of answering steps i+1..j-1 with the feature of
    step i (the next update at j; j = T is the end of the run)."""
    steps = sim.shape[0]
    gain = np.zeros((steps, steps + 1))
    for i in range(steps):
        gain[i, i + 2:] = np.cumsum(sim[i, i + 1:])[:steps - i - 1]
    return gain


def schedule_updates(sim: np.ndarray, budget: int) -> list[int]:
    """The ``budget`` update steps (0 among them) maximising the summed similarity of the
    cached feature to every skipped step's feature (dynamic programming over the last
    update's position)."""
    steps = sim.shape[0]
    budget = max(1, min(budget, steps))
    if budget == steps:
        return list(range(steps))
    gain = hold_gain(sim)
    best = np.full((budget, steps), -np.inf)  # best[m, j]: m+1 updates, the last at j
    parent = np.zeros((budget, steps), dtype=int)
    best[0, 0] = 0.0
    for m in range(1, budget):
        for j in range(m, steps):
            candidates = best[m - 1, :j] + gain[:j, j]
            parent[m, j] = int(np.argmax(candidates))
            best[m, j] = candidates[parent[m, j]]
    final = best[budget - 1] + gain[:, steps]
    last = int(np.argmax(final))
    updates = [last]
    for m in range(budget - 1, 0, -1):
        last = parent[m, last]
        updates.append(int(last))
    return sorted(updates)


def bubbling_union(updates: list[set[int]], ffn: list[bool], volatilities: list[float],
                   top_k: int) -> list[set[int]]:
    """The ``top_k`` most volatile feed-forward units take in the update steps of every
    feed-forward unit after them (units are in execution order)."""
    updates = [set(u) for u in updates]
    ffn_units = [i for i, is_ffn in enumerate(ffn) if is_ffn]
    upstream = sorted(ffn_units, key=lambda i: volatilities[i], reverse=True)[:top_k]
    for unit in sorted(upstream, reverse=True):
        for downstream in ffn_units:
            if downstream > unit:
                updates[unit] |= updates[downstream]
    return updates


def plan_schedule(similarities: list[np.ndarray], volatilities: list[float], ffn: list[bool],
                  config: BACConfig) -> list[set[int]]:
    steps = similarities[0].shape[0]
    budget = max(2, round(config.update_ratio * steps))
    updates = [set(schedule_updates(sim, budget)) for sim in similarities]
    return bubbling_union(updates, ffn, volatilities, config.bubble_top_k)


# ----------------------------------------------------------------------------- the units


def caching_units(denoiser: torch.nn.Module) -> list[tuple[str, torch.nn.Module, bool]]:
    """(name, module, is_ffn) of every attention and feed-forward sub-block of the
    transformer blocks, in execution order."""
    blocks = block_lists(denoiser)
    if not blocks:  # a UNet: its transformer blocks sit inside the down/mid/up blocks
        from diffusers.models.attention import BasicTransformerBlock

        blocks = [(name, m) for name, m in denoiser.named_modules() if isinstance(m, BasicTransformerBlock)]
        blocks = _unet_order(blocks)
    units = []
    for block_name, block in blocks:
        for child_name, child in block.named_children():
            if child_name in ATTENTION_NAMES + FFN_NAMES and child is not None:
                units.append((f"{block_name}.{child_name}", child, child_name in FFN_NAMES))
    return units


def _unet_order(blocks):
    """``named_modules`` lists down, up, then mid blocks; the UNet runs down, mid, up."""
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(blocks, key=lambda item: rank.get(item[0].split(".")[0], 3))


def _flat(output) -> torch.Tensor:
    parts = output if isinstance(output, tuple) else (output,)
    return torch.cat([p.detach().float().flatten() for p in parts if torch.is_tensor(p)])


def _shape(value) -> tuple | None:
    first = value[0] if isinstance(value, tuple) else value
    return tuple(first.shape) if torch.is_tensor(first) else None


def calibrate(backend, plan: DiffusionPlan) -> dict[str, Any]:
    """One untimed pass without caching (its own copy of the generator, decoding skipped):
    per unit, the similarity matrix and volatility of its outputs over the steps (the
    conditional branch, or the whole batch when CFG is batched)."""
    denoiser = backend.denoiser
    units = caching_units(denoiser)
    guidance = replace(plan.guidance, branch=None)
    recorded: list[list[torch.Tensor]] = [[] for _ in units]

    def recorder(index):
        def hook(_module, _args, output):
            if guidance.branch != UNCOND:
                recorded[index].append(_flat(output))
        return hook

    run = calibration_call(backend, plan)
    handles = [module.register_forward_hook(recorder(i)) for i, (_, module, _) in enumerate(units)]
    try:
        with torch.no_grad(), tracking_branches(denoiser, guidance):
            backend.pipe(**run)
    finally:
        for handle in handles:
            handle.remove()
    features = [_stack_steps(r) for r in recorded]
    return {"units": [name for name, _, _ in units],
            "similarity": [similarity_matrix(f).round(5).tolist() for f in features],
            "volatility": [round(volatility(f), 6) for f in features]}


def _stack_steps(outputs: list[torch.Tensor]) -> torch.Tensor:
    """One row per step; a changing size (CFG switched off mid-run) keeps the common part."""
    width = min(o.numel() for o in outputs)
    return torch.stack([o[:width] for o in outputs])


class UnitCache:
    """Every unit's ``forward`` answers from its cache outside its update steps; the
    denoiser's pre-hook counts each CFG branch's calls (= its step index)."""

    def __init__(self, denoiser, units, schedule: list[set[int]], guidance):
        self.units, self.schedule, self.guidance = units, schedule, guidance
        self.step: dict[str, int] = {}
        self.cache: dict[str, dict[int, Any]] = {}
        self.computed = self.reused = 0
        self._partial_marked = False
        self.meter = EvalCostMeter(denoiser)
        self.handles = [denoiser.register_forward_pre_hook(self._count)]
        self.patches = [ForwardPatch(module, self._cached(i)) for i, (_, module, _) in enumerate(units)]

    def _branch(self) -> str:
        return self.guidance.branch or "default"

    def _count(self, *_args) -> None:
        branch = self._branch()
        self.step[branch] = self.step.get(branch, -1) + 1
        self._partial_marked = False

    def _cached(self, index: int):
        def make(original):
            def forward(*args, **kwargs):
                branch = self._branch()
                store = self.cache.setdefault(branch, {})
                step = self.step.get(branch, 0)
                shape = _shape(args[0] if args else next(iter(kwargs.values()), None))
                cached_shape, cached = store.get(index, (None, None))
                # the input's shape changed (CFG switched off, a batch of another size): recompute
                if step in self.schedule[index] or cached is None or cached_shape != shape:
                    output = original(*args, **kwargs)
                    store[index] = (shape, output)
                    self.computed += 1
                    return output
                self.reused += 1
                if not self._partial_marked:
                    self.meter.mark_partial()
                    self._partial_marked = True
                return cached
            return forward
        return make

    def remove(self) -> None:
        for patch in reversed(self.patches):
            patch.remove()
        for handle in self.handles:
            handle.remove()
        self.meter.remove()
        self.cache = {}


@register
class BACMethod(Method):
    spec = MethodSpec(
        name="bac",
        title="BAC (block-wise adaptive caching)",
        modalities=("image", "video"),
        families=("dit", "video-dit", "unet"),
        summary="Each attention / feed-forward sub-block gets its own update steps, chosen from a "
                "calibration pass by feature similarity; the most volatile feed-forwards also update "
                "with every downstream one (Bubbling Union). Cached outputs in between.",
        paper="Ji et al. 2025, Block-wise Adaptive Caching for Accelerating Diffusion Policy (seed 138: up to "
              "3x, lossless)",
        lossless=False,
        config=BACConfig,
        slots=("dit-cache",),
        defaults_note="an update budget of a third of the steps (the paper sets the budget per task; a third "
                      "is what its 3x headline implies) and the two most volatile feed-forwards bubbled",
    )
    calibrated: ClassVar[dict[tuple, dict[str, Any]]] = {}

    def attach(self, backend, plan: DiffusionPlan) -> RunHandle:
        require_from_noise(plan, "bac", "its update steps are calibrated on the whole schedule")
        denoiser = backend.denoiser
        units = caching_units(denoiser)
        if not units:
            raise ValidationError(f"bac found no attention or feed-forward sub-blocks in {type(denoiser).__name__}")
        run_stats: dict[str, Any] = {}
        calibration = self.similarities(backend, plan, run_stats)
        if calibration["units"] != [name for name, _, _ in units]:
            raise ValidationError("bac: the stored calibration was made for a different model layout")
        schedule = plan_schedule([np.asarray(s) for s in calibration["similarity"]], calibration["volatility"],
                                 [is_ffn for _, _, is_ffn in units], self.config)
        cache = UnitCache(denoiser, units, schedule, plan.guidance)
        handle = RunHandle(plan, lambda: self.run_stats(cache, schedule, plan, run_stats), self.notes)
        handle.on_remove(cache.remove)
        return handle

    def similarities(self, backend, plan: DiffusionPlan, stats: dict[str, Any]) -> dict[str, Any]:
        """A stored calibration with this plan's settings, else one made earlier in this
        process, else a calibration pass now (reported for the studio to keep)."""
        settings = plan_settings(backend, plan)
        stored = matching_calibration(self.calibrations, SIMILARITY, settings)
        stats["calibrated_this_run"] = False
        if stored is not None:
            stats["calibration_id"] = stored.get("id")
            return stored
        key = (backend.model_id, id(backend.denoiser), *settings.values())
        if key not in self.calibrated:
            self.calibrated[key] = calibrate(backend, plan)
            stats["calibrated_this_run"] = True
            stats["calibration"] = {"kind": SIMILARITY, **self.calibrated[key], "settings": settings, "prompts": 1}
        return self.calibrated[key]

    @staticmethod
    def run_stats(cache: UnitCache, schedule: list[set[int]], plan: DiffusionPlan,
                  extra: dict[str, Any]) -> dict[str, Any]:
        evaluated = cache.computed + cache.reused
        return {
            "units": len(schedule),
            "unit_updates_planned": sum(len(s) for s in schedule),
            "unit_evals": cache.computed,
            "unit_reused": cache.reused,
            "unit_reuse_rate": round(cache.reused / evaluated, 3) if evaluated else 0.0,
            **cache.meter.stats(),
            **extra,
        }

    def notes(self, plan: DiffusionPlan) -> list[str]:
        if self.config.update_ratio >= 1.0:
            return ["bac with update_ratio 1 updates every sub-block at every step: no speed-up"]
        if plan.steps <= 2:
            return [f"bac: {plan.steps} steps leave nothing to cache"]
        return []
