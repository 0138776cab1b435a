"""Masked-diffusion LM decoding (LLaDA): the loop the diffusion-LM backend runs and its methods edit.

Generation (Nie et al. 2025, "Large Language Diffusion Models", LLaDA, Algorithm 4 with
low-confidence remasking): the prompt is followed by ``gen_length`` mask tokens; the
answer is split into blocks of ``block_length`` decoded left to right (semi-autoregressive);
each block gets its share of ``steps`` denoising steps, and each step runs the model,
predicts every masked token of the block and keeps the ``k`` most confident predictions
(``k``: the block's tokens spread evenly over its steps), the rest stay masked. With
``steps == gen_length`` one token is committed per forward.

What methods change (fields of ``DiffusionDecodingPlan``):

``threshold`` (Fast-dLLM, Wu et al. 2025, confidence-aware parallel decoding)
    each step also commits every masked token whose confidence exceeds the threshold, so
    a step commits ``max(k, #above)`` tokens: with a threshold of 1.0 nothing exceeds it
    and decoding is the baseline's, exactly.
``factor`` (Fast-dLLM's factor-based rule, the paper's alternative to the threshold)
    each step commits the ``n`` most confident masked tokens of the block for the largest
    ``n`` with ``(n + 1) * (1 - c_n) < factor`` (``c_n``: the n-th highest confidence; at
    least one, at least the schedule's ``k``). The paper's bound says a product of marginals
    this confident is a good stand-in for the joint; the admitted confidence falls as
    ``1 - factor / (n + 1)``, so a second token needs ``c > 1 - factor / 3`` (0.67 at factor
    1). Set, it replaces the threshold rule.
``cache``
    how much of the sequence each forward recomputes. ``none``: all of it (the baseline).
    ``prefix`` (Fast-dLLM prefix cache): one full forward at the start of each block keeps
    the K/V of everything before the block; later steps of the block recompute the block
    and what follows. ``dual`` (Fast-dLLM dual cache): the K/V after the block are kept
    too; later steps recompute the block only. ``delayed`` (dKV-Cache-Decode, Ma et al.
    2025): a token's K/V is cached one step *after* it is decoded (computed with the token
    itself as input, no longer the mask) and reused from then on; masked positions are
    recomputed every step; ``refresh_interval`` > 0 recomputes everything every that many
    steps. All are approximations: a cached K/V does not see later changes elsewhere.

Attention is bidirectional, so the order of keys in the cache does not matter: a cache
is a set of (position-encoded) K/V, and a forward over any subset of positions (passed
with their ``position_ids``) attends to that set plus itself. With Dream-style shifted
prediction (``shift = 1``) the logits for position ``p`` come from the output at
``p - 1``, so a forward that needs them also recomputes ``p - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from backends.plan import DecodingPlan
from backends.types import ValidationError

CACHE_MODES = ("none", "prefix", "dual", "delayed")
KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), shaped (1, heads, n, head_dim)


@dataclass
class DiffusionDecodingPlan(DecodingPlan):
    """A diffusion-LM run: ``max_new_tokens`` is LLaDA's gen_length."""

    steps: int = 0
    block_length: int = 32
    threshold: float | None = None
    factor: float | None = None
    cache: str = "none"
    refresh_interval: int = 0


class Runner(Protocol):
    """A model as the loop calls it. ``forward(ids, positions, past, keep)``: logits (n, vocab)
    for the tokens ``ids`` at ``positions`` attending to themselves and ``past`` (K/V of
    other positions, or None); with ``keep`` also the K/V the forward computed for them."""

    mask_id: int
    shift: int
    supports_cache: bool

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, past: KV | None,
                keep: bool) -> tuple[torch.Tensor, KV | None]: ...


@dataclass
class LoopStats:
    forwards: int = 0
    positions_computed: int = 0
    committed_per_step: list[int] = field(default_factory=list)

    def as_extra(self, full_positions: int) -> dict[str, Any]:
        ideal = self.forwards * full_positions
        return {"denoising_forwards": self.forwards, "positions_computed": self.positions_computed,
                "positions_recomputed_share": round(self.positions_computed / ideal, 4) if ideal else None,
                "tokens_per_denoising_step": round(sum(self.committed_per_step) / self.forwards, 3)
                if self.forwards else None}


def block_spans(start: int, gen_length: int, block_length: int) -> list[tuple[int, int]]:
    end = start + gen_length
    return [(s, min(s + block_length, end)) for s in range(start, end, block_length)]


def steps_per_block(steps: int, n_blocks: int) -> list[int]:
    """``steps`` spread over the blocks (earlier blocks take the remainder), at least 1 each."""
    return [max(1, steps // n_blocks + (i < steps % n_blocks)) for i in range(n_blocks)]


def transfer_schedule(n_tokens: int, n_steps: int) -> list[int]:
    """LLaDA's ``get_num_transfer_tokens``: tokens committed per step, spread evenly."""
    n_steps = max(1, min(n_steps, n_tokens))
    return [n_tokens // n_steps + (i < n_tokens % n_steps) for i in range(n_steps)]


def check_plan(plan: DiffusionDecodingPlan, runner: Runner) -> None:
    if plan.cache not in CACHE_MODES:
        raise ValidationError(f"unknown cache mode {plan.cache!r}; expected one of {', '.join(CACHE_MODES)}")
    if plan.cache != "none" and not runner.supports_cache:
        raise ValidationError("this diffusion LM's code has no key/value cache interface, so the cached modes "
                              "cannot run on it; use parallel decoding alone (cache=none)")


class _Canvas:
    """The sequence being denoised and the forwards that read it."""

    def __init__(self, runner: Runner, prompt: torch.Tensor, gen_length: int, stats: LoopStats):
        self.runner, self.stats = runner, stats
        self.x = torch.cat([prompt.reshape(-1), torch.full((gen_length,), runner.mask_id, dtype=torch.long,
                                                            device=prompt.device)])
        self.positions = torch.arange(self.x.numel(), device=prompt.device)

    @property
    def masked(self) -> torch.Tensor:
        return self.x == self.runner.mask_id

    def run(self, query: torch.Tensor, past: KV | None, keep: bool) -> tuple[torch.Tensor, KV | None]:
        """Forward over the positions ``query`` (sorted indices); logits per query position."""
        self.stats.forwards += 1
        self.stats.positions_computed += int(query.numel())
        return self.runner.forward(self.x[query][None], self.positions[query], past, keep)


def _take(kv: KV, index: torch.Tensor) -> KV:
    return [(k.index_select(-2, index), v.index_select(-2, index)) for k, v in kv]


class _FullForwards:
    """cache=none: every step recomputes the whole sequence."""

    def __init__(self, canvas: _Canvas):
        self.canvas = canvas

    def start_block(self, span: tuple[int, int]) -> None:
        pass

    def logits_for(self, targets: torch.Tensor) -> torch.Tensor:
        c = self.canvas
        logits, _ = c.run(c.positions, None, False)
        return logits[targets - c.runner.shift]


class _BlockCache:
    """Fast-dLLM: a full forward at each block start keeps the K/V outside the recomputed
    window (``prefix``: before the block; ``dual``: before and after it)."""

    def __init__(self, canvas: _Canvas, dual: bool):
        self.canvas, self.dual = canvas, dual
        self.past: KV | None = None
        self.window: torch.Tensor | None = None

    def start_block(self, span: tuple[int, int]) -> None:
        self.past, self.span = None, span

    def logits_for(self, targets: torch.Tensor) -> torch.Tensor:
        c, shift = self.canvas, self.canvas.runner.shift
        if self.past is None:  # first step of the block: everything, and keep the K/V
            logits, kv = c.run(c.positions, None, True)
            start, end = self.span
            lo = max(start - shift, 0)
            hi = end if self.dual else c.x.numel()
            self.window = c.positions[lo:hi]
            outside = torch.cat([c.positions[:lo], c.positions[hi:]])
            self.past = _take(kv, outside)
            return logits[targets - shift]
        logits, _ = c.run(self.window, self.past, False)
        return logits[targets - shift - self.window[0]]


class _DelayedCache:
    """dKV-Cache-Decode: K/V of decoded tokens, cached one step after their decoding."""

    def __init__(self, canvas: _Canvas, refresh_interval: int):
        self.canvas, self.refresh = canvas, refresh_interval
        self.kv: KV | None = None  # per layer, every position (valid ones meaningful)
        self.valid = torch.zeros_like(canvas.x, dtype=torch.bool)
        self.step = 0

    def start_block(self, span: tuple[int, int]) -> None:
        pass

    def logits_for(self, targets: torch.Tensor) -> torch.Tensor:
        c, shift = self.canvas, self.canvas.runner.shift
        unmasked_now = ~c.masked
        full = self.kv is None or (self.refresh > 0 and self.step % self.refresh == 0)
        self.step += 1
        if full:
            logits, kv = c.run(c.positions, None, True)
            self.kv = kv
            self.valid = unmasked_now.clone()  # every non-mask input's K/V is now computed from its token
            return logits[targets - shift]
        need = ~self.valid
        need[targets - shift] = True
        query = c.positions[need]
        past = _take(self.kv, c.positions[~need]) if bool((~need).any()) else None
        logits, kv = c.run(query, past, True)
        cacheable = unmasked_now[query] & ~self.valid[query]  # decoded before this step: cache from now on
        if bool(cacheable.any()):
            rows, where = query[cacheable], cacheable.nonzero().reshape(-1)
            for (k_all, v_all), (k_new, v_new) in zip(self.kv, kv):
                k_all[..., rows, :] = k_new[..., where, :]
                v_all[..., rows, :] = v_new[..., where, :]
            self.valid[rows] = True
        index = torch.searchsorted(query, targets - shift)
        return logits[index]


def _forwards_for(plan: DiffusionDecodingPlan, canvas: _Canvas):
    if plan.cache == "prefix":
        return _BlockCache(canvas, dual=False)
    if plan.cache == "dual":
        return _BlockCache(canvas, dual=True)
    if plan.cache == "delayed":
        return _DelayedCache(canvas, plan.refresh_interval)
    return _FullForwards(canvas)


def choose(logits: torch.Tensor, sampling: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted tokens (greedy or sampled with the request's seeded generator) and their
    confidence: the model's probability of the token chosen (LLaDA's low-confidence
    remasking keeps the most confident)."""
    pred = sampling.pick(logits)
    conf = logits.float().softmax(-1).gather(-1, pred[:, None]).reshape(-1)
    return pred, conf


def factor_count(conf: torch.Tensor, factor: float) -> int:
    """Fast-dLLM's factor rule: the largest ``n`` with ``(n + 1) * (1 - c_n) < factor`` over
    the confidences sorted high to low (the left side never falls as ``n`` grows, so it is
    the length of the prefix that passes), and at least one token."""
    ranked = torch.sort(conf.double(), descending=True).values
    n = torch.arange(2, ranked.numel() + 2, dtype=torch.float64)
    return max(1, int(((n * (1 - ranked)) < factor).long().cumprod(0).sum()))


def commit_count(scheduled: int, conf: torch.Tensor, threshold: float | None,
                 factor: float | None = None) -> int:
    """Tokens committed this step: the schedule's count, or more where a Fast-dLLM rule is
    set and more predictions are confident enough (``factor`` replaces ``threshold``),
    never more than are masked."""
    k = scheduled
    if factor is not None:
        k = max(k, factor_count(conf, factor))
    elif threshold is not None:
        k = max(k, int((conf > threshold).sum()))
    return min(k, conf.numel())


@torch.inference_mode()
def diffusion_generate(runner: Runner, prompt: torch.Tensor, plan: DiffusionDecodingPlan,
                       on_step: Callable[[torch.Tensor], bool] | None = None) -> tuple[torch.Tensor, LoopStats]:
    """Denoise ``plan.max_new_tokens`` masked tokens after ``prompt``; returns the answer's
    token ids and the loop's counts. ``on_step(answer)`` after every step may return True
    to stop (the answer is final up to an EOS already committed)."""
    check_plan(plan, runner)
    stats = LoopStats()
    gen_length = plan.max_new_tokens
    canvas = _Canvas(runner, prompt, gen_length, stats)
    start = prompt.numel()
    forwards = _forwards_for(plan, canvas)
    spans = block_spans(start, gen_length, max(1, plan.block_length))
    for span, n_steps in zip(spans, steps_per_block(plan.steps or gen_length, len(spans))):
        forwards.start_block(span)
        for scheduled in transfer_schedule(span[1] - span[0], n_steps):
            in_block = canvas.masked[span[0]:span[1]]
            if not bool(in_block.any()):
                break
            targets = canvas.positions[span[0]:span[1]][in_block]
            pred, conf = choose(forwards.logits_for(targets), plan.sampling)
            k = commit_count(scheduled, conf, plan.threshold, plan.factor)
            order = torch.sort(conf, descending=True, stable=True).indices[:k]
            canvas.x[targets[order]] = pred[order]
            stats.committed_per_step.append(k)
            if on_step is not None and on_step(canvas.x[start:]):
                return canvas.x[start:], stats
    return canvas.x[start:], stats
