"""diffusers' own DiT caches behind our Method interface: ``enable_cache`` / ``disable_cache``.

Each method file only says which ``*Config`` it builds from its parameters; this module
does the rest, identically for all of them:

- ``attach`` enables the cache (configs may need the plan's step count); the handle's
  ``remove`` disables it and takes off what diffusers leaves behind (the bound class
  ``forward`` stored back as an instance attribute, empty hook registries), so the model
  is exactly as before;
- stats count, with plain torch hooks, the attention modules that actually computed in
  each denoiser call: whole-stack caches (FirstBlockCache, MagCache) show up as skipped
  calls, per-layer caches (PAB, FasterCache, TaylorSeer) as skipped attention layers;
- per-branch state: PAB and FasterCache keep one state per hook, which true-CFG pipelines
  (FLUX calls the transformer once for cond, once for uncond) would share between the two
  passes, answering one branch with the other's attention. A ``StateManager`` attached to
  one of their hooks receives the pipeline's ``cache_context`` and swaps each hook's state
  to the branch's own.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from backends.accel._block_span import invalidate_registries, restore_forward
from backends.accel._eval_cost import EvalCostMeter
from backends.accel.base import Method
from backends.plan import DiffusionPlan, RunHandle
from backends.types import ValidationError


def require_cache_support(backend, method: str) -> torch.nn.Module:
    denoiser = backend.denoiser
    if denoiser is None or not hasattr(denoiser, "enable_cache"):
        raise ValidationError(
            f"{method} needs a diffusers transformer with enable_cache(); "
            f"{type(denoiser).__name__} has none"
        )
    if denoiser.is_cache_enabled:
        raise ValidationError(
            f"{method}: a diffusers cache ({type(denoiser._cache_config).__name__}) is already enabled on this "
            "model; diffusers allows one at a time"
        )
    return denoiser


class AttentionCounter:
    """Counts, per denoiser call, how many attention modules really computed (a hook on the
    first Linear inside each one: a cached attention or a skipped block never reaches it)."""

    def __init__(self, denoiser: torch.nn.Module, whole_calls: bool = False):
        from diffusers.hooks._common import _ATTENTION_CLASSES

        self.handles = []
        self.per_call: list[int] = []
        self.computed = 0
        self.whole_calls = whole_calls  # a call with no attention computed was answered whole
        self._layers: list[str] = []  # per attention layer of the call in progress: '1' computed
        modules = [m for m in denoiser.modules() if isinstance(m, _ATTENTION_CLASSES)]
        for module in modules:
            leaf = next((m for m in module.modules() if isinstance(m, torch.nn.Linear)), None)
            if leaf is not None:
                self.handles.append(leaf.register_forward_hook(self._counter_for(len(self.handles))))
        self.num_attention = len(self.handles)
        self.handles.append(denoiser.register_forward_pre_hook(self._start))
        self.handles.append(denoiser.register_forward_hook(self._end))
        # registered after _end, so a call with a cached layer is filed as partial in time
        self.costs = EvalCostMeter(denoiser)

    def _counter_for(self, index: int):
        def count(*_args) -> None:
            self.computed += 1
            if index < len(self._layers):
                self._layers[index] = "1"

        return count

    def _start(self, *_args) -> None:
        self._at_start = self.computed
        self._layers = ["0"] * self.num_attention

    def _end(self, *_args) -> None:
        self.per_call.append(self.computed - self._at_start)
        if self.per_call[-1] < self.num_attention:
            layers = "".join(self._layers)
            if self.whole_calls and self.per_call[-1] == 0:
                self.costs.mark_reused(layers)
            else:
                self.costs.mark_partial(layers)

    def reset(self) -> None:
        self.per_call, self.computed = [], 0
        self.costs.reset()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.costs.remove()

    def stats(self) -> dict[str, Any]:
        calls, n = len(self.per_call), self.num_attention
        expected = calls * n
        return {
            "denoiser_calls": calls,
            "full_calls": sum(c == n for c in self.per_call),
            "partial_calls": sum(0 < c < n for c in self.per_call),
            "skipped_calls": sum(c == 0 for c in self.per_call),
            "attention_evals": self.computed,
            "attention_skipped": expected - self.computed,
            "cache_hit_rate": round(1 - self.computed / expected, 3) if expected else 0.0,
            **self.costs.stats(),
        }


def _branch_swapper(hooks: list[Any]):
    from diffusers.hooks.hooks import StateManager

    class BranchSwapper(StateManager):
        """Gives each ``cache_context`` branch its own copy of the hooks' ``state``."""

        def __init__(self):
            super().__init__(object)
            self.hooks = hooks
            self.branch: str | None = None
            self.saved: dict[str, list[Any]] = {}
            self.fresh = [type(h.state) for h in hooks]

        def set_context(self, context) -> None:
            super().set_context(context)
            if context is None or context.name == self.branch:
                return
            if self.branch is not None:
                self.saved[self.branch] = [h.state for h in self.hooks]
            states = self.saved.get(context.name) or [cls() for cls in self.fresh]
            for hook, state in zip(self.hooks, states):
                hook.state = state
            self.branch = context.name

        def reset(self, *args, **kwargs) -> None:
            self.saved, self.branch, self._context = {}, None, None

    return BranchSwapper()


class DiffusersCacheMethod(Method):
    """Subclasses set ``spec`` and implement ``make_config(backend, plan)`` (and optionally
    ``notes(backend, plan)``, the warnings); set ``per_branch_hooks`` to the diffusers hook
    names whose single ``state`` must be kept per CFG branch."""

    per_branch_hooks: ClassVar[tuple[str, ...]] = ()
    # True when the cache answers whole denoiser calls (MagCache, FirstBlockCache past the
    # first block): calls where no attention layer ran are then skipped evaluations. Per-layer
    # caches (PAB, FasterCache, TaylorSeer) still run the feed-forwards of every block.
    skips_whole_calls: ClassVar[bool] = False

    def make_config(self, backend, plan: DiffusionPlan, stats: dict[str, Any]) -> Any:
        """The diffusers cache config for this run; ``stats``: figures of the run so far
        (a calibration...), reported with the handle's stats."""
        raise NotImplementedError

    def notes(self, backend, plan: DiffusionPlan) -> list[str]:
        return []

    def whole_call_skips(self) -> bool:
        return self.skips_whole_calls

    def attach(self, backend, plan: DiffusionPlan) -> "DiffusersCacheHandle":
        handle = DiffusersCacheHandle(self, backend, plan)
        with handle.undo_on_error():
            handle.enable()
        return handle


class DiffusersCacheHandle(RunHandle):
    """One run of a diffusers cache: enabled at attach, disabled (and every trace of it
    taken off) at remove; counts what the attention modules computed meanwhile."""

    def __init__(self, method: DiffusersCacheMethod, backend, plan: DiffusionPlan):
        super().__init__(plan)
        self.method, self.backend = method, backend
        self.denoiser = require_cache_support(backend, method.spec.name)
        self.counter = AttentionCounter(self.denoiser, whole_calls=method.whole_call_skips())
        self.on_remove(self.counter.remove)
        self.run_stats: dict[str, Any] = {}

    def enable(self) -> None:
        config = self.method.make_config(self.backend, self.plan, self.run_stats)  # may calibrate: not timed
        self.counter.reset()
        before = [(m, vars(m).get("forward"), hasattr(m, "_diffusers_hook")) for m in self.denoiser.modules()]
        self.denoiser.enable_cache(config)
        self.on_remove(self._disable, before)
        self._keep_branches_apart()

    def _keep_branches_apart(self) -> None:
        if not self.method.per_branch_hooks:
            return
        hooks = []
        for module in self.denoiser.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None:
                hooks += [h for name, h in registry.hooks.items() if name in self.method.per_branch_hooks]
        if hooks:
            # _set_cache_context hands the context to every StateManager attribute of a
            # stateful hook; riding on the first hook is enough to see every switch.
            hooks[0]._fastgen_branches = _branch_swapper(hooks)

    def _disable(self, before) -> None:
        self.denoiser.disable_cache()
        for module, forward, had_registry in before:
            restore_forward(module, forward)
            registry = getattr(module, "_diffusers_hook", None)
            if not had_registry and registry is not None and not registry.hooks:
                del module._diffusers_hook
        invalidate_registries(self.denoiser)

    def skipped_evals(self, counts: dict[str, Any] | None = None) -> int:
        counts = self.counter.stats() if counts is None else counts
        return counts["skipped_calls"] if self.method.whole_call_skips() else 0

    def stats(self) -> dict[str, Any]:
        counts = self.counter.stats()  # once: the skip count is read from the same numbers
        return {**counts, "skipped_evals": self.skipped_evals(counts), **self.run_stats}

    def warnings(self) -> list[str]:
        return self.method.notes(self.backend, self.plan)


def current_timestep(backend):
    """For configs that need ``current_timestep_callback``: the pipeline's timestep now
    (0-1000 scale), or a value outside every skip range when the pipeline has none."""
    pipe = backend.pipe

    def current() -> float:
        t = getattr(pipe, "current_timestep", None)
        if t is None:
            return -1e9
        return float(t.flatten()[0]) if torch.is_tensor(t) else float(t)

    return current
