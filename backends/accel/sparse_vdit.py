"""Sparse-vDiT (Chen et al. 2025, "Sparse-vDiT: Unleashing the Power of Sparse Attention to
Accelerate Video Diffusion Transformers"; seed 439; the per-head static patterns are the
part Sparse VideoGen2 shares): each self-attention head of a video DiT runs one fixed
sparse pattern (diagonal, multi-diagonal, vertical stripe, or dense), found offline.

The paper finds that a head's attention map keeps its shape across prompts and steps and
depends on the layer and the head: so the pattern is searched once per model, on a
calibration run, and reused. Here:

1. **Calibration** (first run for a model and setting, one extra untimed pass without
   decoding): the self-attention processors record, per layer and head, the softmax mass
   of each (query block, key block) over the steps where sparsity applies
   (``kernels.sparse_heads.block_mass``).
2. **Search**: per head, the cheapest pattern (fewest key blocks) that keeps at least
   ``recall`` of that mass (``search_head``); dense when none does. The result is a
   calibration record (kind ``head_patterns``): reported in the run's stats, kept by the
   studio in its calibration store and handed back with later requests
   (``backends.accel._calibration``), and cached in this process.
3. **Run**: the self-attention processors of the Wan blocks compute Q/K/V exactly as Wan
   does (as STA's processor does, ``backends.accel.sta``), then the layer's heads split by
   pattern (the paper's head fusion, ``kernels.sparse_heads.SparseHeadAttention``): its
   dense heads in one fused SDPA call, its sparse heads in one ``flex_attention`` call with
   a block mask of one pattern per head, which computes only the kept blocks. A layer whose
   heads are all dense keeps Wan's own processor, so the dense pattern is exactly the
   baseline.

The paper also skips 3-6% of heads outright; that is not done here.

Lossy. The gain is at most the attention share of a step times ``1 - kept``; flex_attention
needs ``torch.compile`` on CPU (20 s+ once) and pays only with enough tokens per block
(see ``benchmarks/sparse_vdit_attention.py`` and the README).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from backends.accel._calibration import matching_calibration, plan_settings
from backends.accel._patch import StepCallback
from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.accel.sta import _apply_rotary_emb, wan_self_attention
from backends.plan import DiffusionPlan, RunHandle
from backends.types import ValidationError

PATTERNS = "head_patterns"  # calibration kind


class SparseVDiTConfig(MethodConfig):
    recall: float = param(0.9, min=0.5, max=1.0, step=0.01,
                          help="share of each head's attention mass (on the calibration run) its pattern must "
                               "keep; higher = denser and closer to dense attention")
    block: int = param(64, min=8, max=1024,
                       help="tokens per block of the block-sparse kernel (patterns are whole blocks; the token "
                            "count must be a multiple)")
    dense_steps: int = param(5, min=0, max=1000,
                             help="first denoising steps that keep dense attention (they set the layout)")
    backend: str = param("auto", choices=("auto", "flex", "torch"),
                         help="auto/flex = compiled FlexAttention with a per-head block mask (first call "
                              "compiles, 20 s+ on CPU); torch = masked dense SDPA (the reference: same output, "
                              "no saving)")


@dataclass
class SparseState:
    """What the processors share during one run."""

    grid: tuple[int, int, int] | None = None  # token grid of the current transformer call
    sparse_calls: int = 0
    dense_calls: int = 0
    pairs_computed: int = 0
    pairs_dense: int = 0
    # calibration: per layer, the summed block mass [heads, nb, nb] and how many calls it sums
    mass: dict[int, torch.Tensor] = field(default_factory=dict)
    mass_calls: dict[int, int] = field(default_factory=dict)


def _qkv(attn, hidden_states, rotary_emb):
    """Q, K, V as ``[batch, heads, tokens, dim]``, computed exactly as Wan's processor does."""
    from diffusers.models.transformers.transformer_wan import _get_qkv_projections

    query, key, value = _get_qkv_projections(attn, hidden_states, None)
    query, key = attn.norm_q(query), attn.norm_k(key)
    query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
    if rotary_emb is not None:
        query = _apply_rotary_emb(query, *rotary_emb)
        key = _apply_rotary_emb(key, *rotary_emb)
    return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)


class _Processor:
    """Wraps a Wan self-attention processor; anything it does not handle goes to the original."""

    def __init__(self, original: Any, layer: int, state: SparseState, counter: StepCallback, block: int,
                 dense_steps: int):
        self.original, self.layer, self.state, self.counter = original, layer, state, counter
        self.block, self.dense_steps = block, dense_steps

    def __getattr__(self, name: str) -> Any:  # _attention_backend, _parallel_config, ...
        original = self.__dict__.get("original")
        if original is None:
            raise AttributeError(name)
        return getattr(original, name)

    def applies(self, hidden_states, encoder_hidden_states, attention_mask, kwargs) -> bool:
        grid, tokens = self.state.grid, hidden_states.shape[1]
        return (encoder_hidden_states is None and attention_mask is None and not kwargs and grid is not None
                and tokens == math.prod(grid) and tokens % self.block == 0
                and self.counter.step >= self.dense_steps)


class RecordingProcessor(_Processor):
    """Calibration: dense attention as Wan computes it, plus the block mass of each head."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        if self.applies(hidden_states, encoder_hidden_states, attention_mask, kwargs):
            from kernels.sparse_heads import attention_block_mass

            with torch.no_grad():
                query, key, _ = _qkv(attn, hidden_states, rotary_emb)
                mass = attention_block_mass(query, key, self.block)
            state = self.state
            state.mass[self.layer] = state.mass.get(self.layer, 0) + mass
            state.mass_calls[self.layer] = state.mass_calls.get(self.layer, 0) + 1
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)


class SparseProcessor(_Processor):
    """The run: one block-sparse attention call for all heads of the layer."""

    def __init__(self, *args, masks: torch.Tensor, backend: str, **kwargs):
        from kernels.sparse_heads import SparseHeadAttention

        super().__init__(*args, **kwargs)
        self.attention = SparseHeadAttention(masks, self.block, backend)  # masks: [heads, nb, nb] bool
        self.kept = self.attention.kept

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        state = self.state
        batch, tokens = hidden_states.shape[:2]
        pairs = batch * attn.heads * tokens * tokens
        state.pairs_dense += pairs
        fits = self.attention.masks.shape[1] * self.block == tokens
        if not (fits and self.applies(hidden_states, encoder_hidden_states, attention_mask, kwargs)):
            state.dense_calls += 1
            state.pairs_computed += pairs
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        query, key, value = _qkv(attn, hidden_states, rotary_emb)
        out = self.attention(query, key, value)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        state.sparse_calls += 1
        state.pairs_computed += round(pairs * self.kept)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _grid_recorder(state: SparseState, patch_size: tuple[int, ...]):
    def record_grid(_module, args, kwargs) -> None:
        latent = kwargs.get("hidden_states", args[0] if args else None)
        state.grid = None if latent is None or latent.ndim != 5 else \
            tuple(s // p for s, p in zip(latent.shape[2:], patch_size))

    return record_grid


def record_block_mass(backend, plan: DiffusionPlan, block: int, dense_steps: int) -> tuple[dict[int, torch.Tensor],
                                                                                             tuple[int, int, int]]:
    """Run the plan once without decoding (its own generator copy, none of the plan's other
    callbacks) and return, per layer, the mean block mass ``[heads, nb, nb]`` over the
    self-attention calls from step ``dense_steps`` on, and the token grid."""
    denoiser = backend.denoiser
    modules, patch = wan_self_attention(denoiser, "Sparse-vDiT")
    state, counter = SparseState(), StepCallback()
    calibration = replace(plan, kwargs=dict(plan.kwargs), callbacks=[counter], guidance=replace(plan.guidance))
    generator = plan.kwargs.get("generator")
    if isinstance(generator, torch.Generator):
        calibration.kwargs["generator"] = torch.Generator(generator.device).set_state(generator.get_state())
    run = backend.pipeline_kwargs(calibration)
    if "output_type" in backend.call_params:
        run["output_type"] = "latent"
    originals = [m.processor for m in modules]
    hook = denoiser.register_forward_pre_hook(_grid_recorder(state, patch), with_kwargs=True)
    try:
        for layer, module in enumerate(modules):
            module.set_processor(RecordingProcessor(module.processor, layer, state, counter, block, dense_steps))
        with torch.no_grad():
            backend.pipe(**run)
    finally:
        hook.remove()
        for module, original in zip(modules, originals):
            module.set_processor(original)
    if not state.mass or state.grid is None:
        raise ValidationError(f"Sparse-vDiT's calibration saw no self-attention it can make sparse: the token count "
                              f"must be a multiple of block={block} and the run longer than {dense_steps} dense steps")
    return {layer: mass / state.mass_calls[layer] for layer, mass in state.mass.items()}, state.grid


def search_patterns(masses: dict[int, torch.Tensor], grid: tuple[int, int, int], block: int,
                    recall: float) -> list[list[dict[str, Any]]]:
    """Per layer and head, the cheapest pattern reaching ``recall`` (as dicts, for the store)."""
    from kernels.sparse_heads import search_head

    frame_blocks = grid[1] * grid[2] / block
    return [[search_head(head_mass, recall, frame_blocks).to_dict() for head_mass in masses[layer]]
            for layer in sorted(masses)]


@register
class SparseVDiTMethod(Method):
    spec = MethodSpec(
        name="sparse_vdit",
        title="Sparse-vDiT (per-head sparse attention patterns)",
        modalities=("video",),
        families=("video-dit",),
        summary="Each self-attention head runs one fixed block-sparse pattern (diagonal, multi-diagonal, vertical "
                "stripe or dense), the cheapest that keeps enough attention mass on a calibration run.",
        paper="Chen et al. 2025, Sparse-vDiT: Unleashing the Power of Sparse Attention to Accelerate Video "
              "Diffusion Transformers (seed 439: 1.76x CogVideoX1.5, 1.85x HunyuanVideo, 1.58x Wan2.1); "
              "Sparse VideoGen2 (seed 148: 1.89x Wan2.1)",
        lossless=False,
        config=SparseVDiTConfig,
        slots=("attention",),
        defaults_note="recall 0.9 (attention-mass recall) stands in for the paper's search criterion and "
                      "hardware cost model; the first 5 steps stay dense, as the video sparse-attention papers "
                      "keep their first steps dense",
    )
    # patterns found in this process: (model, denoiser id, settings...) -> record
    found: ClassVar[dict[tuple, dict[str, Any]]] = {}

    def settings(self, backend, plan: DiffusionPlan) -> dict[str, Any]:
        return {**plan_settings(backend, plan), "block": self.config.block, "recall": self.config.recall,
                "dense_steps": self.config.dense_steps}

    def patterns(self, backend, plan: DiffusionPlan, stats: dict[str, Any]) -> dict[str, Any]:
        """This model's head patterns for this plan: a stored calibration with the same
        settings, else one found earlier in this process, else a calibration pass now
        (reported in ``stats["calibration"]`` for the studio to keep)."""
        settings = self.settings(backend, plan)
        stored = matching_calibration(self.calibrations, PATTERNS, settings)
        if stored is not None:
            stats["calibration_id"] = stored.get("id")
            return stored
        key = (backend.model_id, id(backend.denoiser), *map(str, settings.values()))
        if key not in self.found:
            masses, grid = record_block_mass(backend, plan, self.config.block, self.config.dense_steps)
            self.found[key] = {"kind": PATTERNS, "settings": settings, "grid": list(grid), "block": self.config.block,
                               "patterns": search_patterns(masses, grid, self.config.block, self.config.recall),
                               "prompts": 1}
            stats["calibrated_this_run"] = True
            stats["calibration"] = self.found[key]
        return self.found[key]

    def attach(self, backend, plan: DiffusionPlan) -> RunHandle:
        from kernels.sparse_heads import HeadPattern, head_masks

        denoiser = backend.denoiser
        modules, patch = wan_self_attention(denoiser, "Sparse-vDiT")
        stats: dict[str, Any] = {"calibrated_this_run": False}
        record = self.patterns(backend, plan, stats)
        patterns = [[HeadPattern.from_dict(h) for h in layer] for layer in record["patterns"]]
        if len(patterns) != len(modules):
            raise ValidationError(f"the stored Sparse-vDiT patterns are for {len(patterns)} layers; this model has "
                                  f"{len(modules)}")
        grid, block = tuple(record["grid"]), int(record["block"])
        blocks, frame_blocks = math.prod(grid) // block, grid[1] * grid[2] / block
        state, counter = SparseState(), StepCallback()
        plan.callbacks.append(counter)
        handle = RunHandle(plan, lambda: self.run_stats(state, stats, patterns), self.notes)
        with handle.undo_on_error():  # a failure midway puts back the processors already swapped
            for layer, (module, heads) in enumerate(zip(modules, patterns)):
                if all(h.kind == "dense" for h in heads):
                    continue  # Wan's own processor: the dense pattern is the baseline exactly
                masks = head_masks(heads, blocks, frame_blocks)
                handle.on_remove(module.set_processor, module.processor)
                module.set_processor(SparseProcessor(module.processor, layer, state, counter, block,
                                                     self.config.dense_steps, masks=masks,
                                                     backend=self.config.backend))
            handle.on_remove(denoiser.register_forward_pre_hook(_grid_recorder(state, patch),
                                                                with_kwargs=True).remove)
        return handle

    @staticmethod
    def run_stats(state: SparseState, stats: dict[str, Any], patterns) -> dict[str, Any]:
        heads = [h for layer in patterns for h in layer]
        kinds = {kind: sum(h.kind == kind for h in heads) for kind in sorted({h.kind for h in heads})}
        return {
            **stats,
            "head_patterns": kinds,
            "kept_fraction": round(sum(h.kept for h in heads) / len(heads), 4) if heads else 1.0,
            "sparse_calls": state.sparse_calls,
            "dense_calls": state.dense_calls,
            "attention_pairs": state.pairs_computed,
            "dense_attention_pairs": state.pairs_dense,
            "pairs_fraction": round(state.pairs_computed / state.pairs_dense, 4) if state.pairs_dense else 1.0,
        }

    def notes(self, plan: DiffusionPlan) -> list[str]:
        if self.config.dense_steps >= plan.steps:
            return [f"Sparse-vDiT keeps dense attention for the first {self.config.dense_steps} steps and this run "
                    f"has {plan.steps}: it never applies"]
        return []
