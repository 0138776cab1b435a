"""Residual caching over a span of transformer blocks, shared by TeaCache and Δ-DiT/FORA.

A DiT's blocks are a chain ``h -> h + f_i(h)``. When a step is answered from the cache,
the first block of a span returns ``input + residual`` (the span's ``output - input`` at
the last computed step) and the other blocks of the span pass their input through;
when a step is computed, the span's last block records the new residual. What decides
"compute or reuse" is the method's own small function, so this module is only the
mechanics.

The hooks are diffusers ``ModelHook``s in the blocks' ``HookRegistry``: their state lives
in a ``StateManager``, which the pipeline's ``cache_context("cond"/"uncond")`` switches,
so the conditional and unconditional passes of true CFG (FLUX) keep separate caches.
Pipelines that set no context share one ``"default"`` branch.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from backends.accel._eval_cost import EvalCostMeter
from backends.plan import RunHandle
from backends.types import ValidationError

SPAN_HEAD_HOOK = "fastgen_span_head"
SPAN_BLOCK_HOOK = "fastgen_span_block"


def block_lists(denoiser: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every transformer block of a diffusers DiT, in execution order (FLUX: the dual-stream
    ``transformer_blocks`` then the ``single_transformer_blocks``)."""
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

    blocks = []
    for name, child in denoiser.named_children():
        if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, torch.nn.ModuleList):
            blocks += [(f"{name}.{i}", block) for i, block in enumerate(child)]
    return blocks


def block_metadata(block: torch.nn.Module, method: str):
    """diffusers' description of where a block takes and returns its two streams."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    try:
        return TransformerBlockRegistry.get(type(block))
    except ValueError:
        raise ValidationError(
            f"{method} does not know how {type(block).__name__} returns its hidden states "
            "(it is not in diffusers' TransformerBlockRegistry)"
        ) from None


def _branch_state_manager(state_cls):
    from diffusers.hooks.hooks import CacheContext, StateManager

    class BranchStateManager(StateManager):
        """A StateManager that falls back to one branch when no cache context is set."""

        @property
        def context(self):
            return self._context if self._context is not None else CacheContext("default")

        def branches(self) -> dict[str, Any]:
            return dict(self._state_cache)

    return BranchStateManager(state_cls)


def _base_state():
    from diffusers.hooks.hooks import BaseState

    class SpanState(BaseState):
        """Per-branch cache of one span: its input at the last computed step, its residual,
        whether the current call reuses it, and room for the deciding method's own numbers."""

        def __init__(self) -> None:
            self.reset()

        def reset(self) -> None:
            self.calls = 0  # denoiser calls seen in this branch (= step index before the call)
            self.reuse = False
            self.inputs: tuple[torch.Tensor | None, torch.Tensor | None] | None = None
            self.residuals: tuple[torch.Tensor | None, torch.Tensor | None] | None = None
            self.extra: dict[str, Any] = {}

    return SpanState


def _streams(meta, args, kwargs):
    hidden = meta._get_parameter_from_args_kwargs(meta.hidden_states_argument_name, args, kwargs)
    encoder = None
    if meta.return_encoder_hidden_states_index is not None:
        encoder = meta._get_parameter_from_args_kwargs(meta.encoder_hidden_states_argument_name, args, kwargs)
    return hidden, encoder


def _pack(meta, hidden, encoder):
    if meta.return_encoder_hidden_states_index is None:
        return hidden
    out = [None] * (max(meta.return_hidden_states_index, meta.return_encoder_hidden_states_index) + 1)
    out[meta.return_hidden_states_index] = hidden
    out[meta.return_encoder_hidden_states_index] = encoder
    return tuple(out)


def _unpack(meta, output):
    if not isinstance(output, tuple):
        return output, None
    encoder = None
    if meta.return_encoder_hidden_states_index is not None:
        encoder = output[meta.return_encoder_hidden_states_index]
    return output[meta.return_hidden_states_index], encoder


def _make_hooks():
    from diffusers.hooks.hooks import ModelHook

    class SpanBlockHook(ModelHook):
        """Every block of the span: pass through while the span is reused; the last block
        records ``output - span input`` whenever the span was computed."""

        _is_stateful = True

        def __init__(self, manager, meta, is_head: bool, is_tail: bool,
                     decide: Callable[[torch.nn.Module, tuple, dict, Any], bool] | None,
                     on_call: Callable[[str, bool], None] | None):
            super().__init__()
            self.state_manager = manager
            self.meta, self.is_head, self.is_tail = meta, is_head, is_tail
            self.decide, self.on_call = decide, on_call

        def new_forward(self, module, *args, **kwargs):
            state = self.state_manager.get_state()
            hidden, encoder = _streams(self.meta, args, kwargs)
            if self.is_head:
                reuse = self._should_reuse(module, args, kwargs, state)
                state.calls += 1
                state.reuse = reuse
                if self.on_call is not None:
                    self.on_call(self.state_manager.context.name, reuse)
                if reuse:
                    res_h, res_e = state.residuals
                    return _pack(self.meta, hidden + res_h, encoder + res_e if res_e is not None else encoder)
                state.inputs = (hidden, encoder)
            elif state.reuse:
                return _pack(self.meta, hidden, encoder)
            output = self.fn_ref.original_forward(*args, **kwargs)
            if self.is_tail:
                out_h, out_e = _unpack(self.meta, output)
                in_h, in_e = state.inputs
                res_e = out_e - in_e if out_e is not None and in_e is not None else None
                state.residuals = (out_h - in_h, res_e)
            return output

        @torch.compiler.disable
        def _should_reuse(self, module, args, kwargs, state) -> bool:
            wants_reuse = bool(self.decide(module, args, kwargs, state))  # always called: it may keep accumulators
            return wants_reuse and state.residuals is not None

        def reset_state(self, module):
            self.state_manager.reset()
            return module

    return SpanBlockHook


class SpanCache:
    """Hooks a contiguous span of blocks; ``remove()`` takes every hook out again and puts
    each block's ``forward`` back exactly as it was."""

    def __init__(self, denoiser: torch.nn.Module, blocks: list[torch.nn.Module], decide, method: str):
        from diffusers.hooks.hooks import HookRegistry

        if not blocks:
            raise ValidationError(f"{method} found no transformer blocks to cache in this model")
        self.denoiser, self.blocks = denoiser, blocks
        # per CFG branch, one entry per denoiser call: True when the span was reused.
        # Kept after remove(), so a method can report the run it just finished.
        self.calls: dict[str, list[bool]] = {}
        # a reused call (the check, the blocks outside the span) is a partial evaluation
        self.costs = EvalCostMeter(denoiser)
        self.manager = _branch_state_manager(_base_state())
        # for the timeline: which of the denoiser's blocks a reused call leaves out ('0')
        in_span = {id(block) for block in blocks}
        every_block = [block for _, block in block_lists(denoiser)] or blocks
        self._reused_blocks = "".join("0" if id(block) in in_span else "1" for block in every_block)
        self._whole_stack = "1" not in self._reused_blocks
        hook_cls = _make_hooks()
        self._previous = [vars(block).get("forward") for block in blocks]
        self._had_registry = [hasattr(block, "_diffusers_hook") for block in blocks]
        metas = [block_metadata(block, method) for block in blocks]
        for i, (block, meta) in enumerate(zip(blocks, metas)):
            hook = hook_cls(self.manager, meta, is_head=i == 0, is_tail=i == len(blocks) - 1,
                            decide=decide if i == 0 else None, on_call=self._record if i == 0 else None)
            name = SPAN_HEAD_HOOK if i == 0 else SPAN_BLOCK_HOOK
            HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, name)
        # cache_context walks a cached list of the registries under the denoiser: it must
        # see the new ones, or the cond/uncond context would never reach these hooks.
        invalidate_registries(denoiser)

    def _record(self, branch: str, reused: bool) -> None:
        self.calls.setdefault(branch, []).append(reused)
        if reused:  # the span's blocks were not run: the whole stack reused, or the rest computed
            mark = self.costs.mark_reused if self._whole_stack else self.costs.mark_partial
            mark(self._reused_blocks)

    def branches(self) -> dict[str, Any]:
        return self.manager.branches()

    def remove(self) -> None:
        self.costs.remove()
        for i, (block, previous, had) in enumerate(zip(self.blocks, self._previous, self._had_registry)):
            registry = block._diffusers_hook
            registry.remove_hook(SPAN_HEAD_HOOK if i == 0 else SPAN_BLOCK_HOOK, recurse=False)
            restore_forward(block, previous)
            if not had and not registry.hooks:
                del block._diffusers_hook
        invalidate_registries(self.denoiser)
        self.manager.reset()


def step_stats(calls: dict[str, list[bool]], whole_stack: bool = True) -> dict[str, Any]:
    """Steps computed / reused (first branch), reused calls over all branches, hit rate.

    ``whole_stack``: the span is every block, so a reused call ran none of the network and
    is reported as ``skipped_evals`` (what ``Result.model_evals`` subtracts); a partial
    span's reused calls still ran the other blocks and remain evaluations."""
    first = next(iter(calls.values()), [])
    skipped = sum(sum(v) for v in calls.values())
    total = sum(len(v) for v in calls.values())
    return {
        "computed_steps": len(first) - sum(first),
        "skipped_steps": sum(first),
        "skipped_calls": skipped,
        "skipped_evals": skipped if whole_stack else 0,
        "branches": len(calls),
        "cache_hit_rate": round(skipped / total, 3) if total else 0.0,
    }


def span_handle(plan: Any, cache: SpanCache, own_stats, notes, whole_stack: bool = True) -> RunHandle:
    """The run handle of a span cache: step figures (``step_stats``) and the measured full vs
    partial costs, then the method's own figures; removing it unhooks the span."""
    def stats() -> dict[str, Any]:
        return {**step_stats(cache.calls, whole_stack), **cache.costs.stats(), **own_stats()}

    handle = RunHandle(plan, stats, notes, lambda: step_stats(cache.calls, whole_stack)["skipped_evals"])
    handle.on_remove(cache.remove)
    return handle


def invalidate_registries(module: torch.nn.Module) -> None:
    """Make ``cache_context`` re-discover the hook registries under ``module``."""
    from diffusers.hooks.hooks import HookRegistry

    HookRegistry.check_if_exists_or_initialize(module).invalidate_child_registries_cache()


def restore_forward(module: torch.nn.Module, previous: Any) -> None:
    """diffusers' ``remove_hook`` leaves the bound class ``forward`` behind as an instance
    attribute; take it off so the module is exactly as before (class method in force)."""
    current = vars(module).get("forward")
    if previous is None and current is not None and getattr(current, "__func__", None) is type(module).forward \
            and getattr(current, "__self__", None) is module:
        del module.forward
