"""Lookahead decoding (Fu et al. 2024, "Break the Sequential Dependency of LLM Inference
Using Lookahead Decoding"): Jacobi iterations generate n-grams, verified in the same forward.

Every step is one forward of the target over three parts, with a custom 4-D attention mask:

- the current token ``c`` (the last accepted one, its K/V not cached yet);
- the *lookahead branch*: a 2-D window of ``N - 1`` levels x ``W`` guessed tokens from the
  previous Jacobi iterations. Column ``i`` is read as the sequence
  ``c, a0[0..i], a1[i], ..., a{N-2}[i]`` (positions ``p+1+i+l`` for level ``l``), so the
  output at the top level of column ``i`` is the next Jacobi guess for that column, and
  ``(a0[i], a1[i], ..., a{N-2}[i], output)`` is an n-gram the model produced: it goes into
  the n-gram pool, keyed by its first token. The levels then shift down by one.
- the *verification branch*: up to ``G`` pool n-grams that start with ``c``'s successor
  guess, each attending only to the prefix, ``c`` and its own earlier tokens.

The output at ``c`` is the next token (always correct); a candidate's tokens are accepted
while each equals the model's own greedy choice at the token before it, so the output is
token-for-token plain greedy decoding, up to ``N`` tokens per forward. The K/V of the
accepted candidate tokens are kept (gathered from the scattered positions), the rest of
the forward's entries are dropped from the cache.

Greedy only. On CPU a verification forward of 20-40 tokens costs 2-2.6x a one-token
forward (CALIBRATION.md), so small windows (W 3-5, G 3-5) are the ones that can pay.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from backends.accel.base import Method, MethodSpec, Param, register
from backends.accel._decoding import (
    DECODING_METHODS,
    DecodeState,
    decoding_stats,
    require_greedy,
    set_decoder,
)


@dataclass(frozen=True)
class LookaheadConfig:
    """window (W): Jacobi positions guessed ahead; more finds more n-grams, costs a wider forward.
    ngram (N): n-gram size; each step accepts at most N tokens.
    branches (G): pool candidates verified per step.
    prompt_ngrams: also seed the pool with the prompt's own n-grams (cheap; pays on code
        editing and repetitive text, where the output copies the prompt).
    """

    window: int = 4
    ngram: int = 4
    branches: int = 4
    prompt_ngrams: bool = True


@dataclass
class LookaheadState:
    steps: int = 0
    tokens: int = 0
    pool_hits: int = 0  # tokens accepted from verified n-grams (beyond the one per step)
    pool_size: int = 0
    pool: dict[int, list[tuple[int, ...]]] = field(default_factory=dict)

    def reset(self) -> None:
        self.steps = self.tokens = self.pool_hits = self.pool_size = 0
        self.pool = {}

    def add(self, ngram: tuple[int, ...], cap: int) -> None:
        """Keep the ``cap`` most recent distinct continuations per first token."""
        key, rest = ngram[0], ngram[1:]
        entries = self.pool.setdefault(key, [])
        if rest in entries:
            entries.remove(rest)
        else:
            self.pool_size += 1
        entries.append(rest)
        if len(entries) > cap:
            entries.pop(0)
            self.pool_size -= 1


@functools.lru_cache(maxsize=64)
def _layout(W: int, N: int, G: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Which new token sees which (q x q, bool) and the position offsets (from ``c``) of the
    ``1 + (N-1)W + G(N-1)`` new tokens, laid out as: c, level 0..N-2 (W each), candidates."""
    levels = N - 1
    q = 1 + levels * W + G * levels
    allowed = torch.zeros(q, q, dtype=torch.bool)
    offsets = [0]
    allowed[:, 0] = True

    def la(level: int, col: int) -> int:
        return 1 + level * W + col

    for level in range(levels):
        for col in range(W):
            row = la(level, col)
            offsets.append(1 + col + level)
            for j in range(col + 1):
                allowed[row, la(0, j)] = True
            for lv in range(1, level + 1):
                allowed[row, la(lv, col)] = True
    base = 1 + levels * W
    for g in range(G):
        for j in range(levels):
            row = base + g * levels + j
            offsets.append(1 + j)
            allowed[row, base + g * levels: row + 1] = True
    return allowed, tuple(offsets)


def lookahead_mask(past: int, W: int, N: int, G: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, list[int]]:
    """Additive 4-D mask (1, 1, q, past + q): every new token sees the whole cache, and
    among the new tokens what ``_layout`` allows."""
    allowed, offsets = _layout(W, N, G)
    q = allowed.shape[0]
    mask = torch.zeros(q, past + q, dtype=dtype, device=device)
    mask[:, past:].masked_fill_(~allowed.to(device), torch.finfo(dtype).min)
    return mask[None, None], list(offsets)


def keep_accepted(cache, past: int, start: int, count: int) -> None:
    """Keep the cache up to ``c`` (``past + 1`` entries) plus ``count`` entries from ``start``
    (the accepted candidate's), moved in place right after ``c``; the rest is dropped."""
    for layer in cache.layers:
        if count:
            layer.keys[..., past + 1: past + 1 + count, :] = layer.keys[..., start: start + count, :]
            layer.values[..., past + 1: past + 1 + count, :] = layer.values[..., start: start + count, :]
        layer.keys = layer.keys[..., : past + 1 + count, :]
        layer.values = layer.values[..., : past + 1 + count, :]


def lookahead_decode(backend, input_ids: torch.Tensor, state: DecodeState, config: LookaheadConfig,
                     stats: LookaheadState) -> None:
    from transformers import DynamicCache

    model = backend.model
    W, N, G = config.window, config.ngram, config.branches
    levels = N - 1
    device = input_ids.device
    prompt = input_ids[0].tolist()
    if config.prompt_ngrams:
        for i in range(len(prompt) - N + 1):
            stats.add(tuple(prompt[i:i + N]), G)

    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    stats.steps += 1
    current = int(state.sampling.pick(out.logits[0, -1]))
    if state.emit([current]):
        return
    # Initial Jacobi guesses: prompt tokens (deterministic); bad guesses only cost hit rate.
    seeds = (prompt * ((levels * W) // len(prompt) + 1))[-levels * W:]
    window = [list(seeds[l * W:(l + 1) * W]) for l in range(levels)]

    while True:
        past = cache.get_seq_length()
        candidates = stats.pool.get(current, [])[-G:]
        candidates = [c for c in candidates if len(c) == levels]
        G_now = len(candidates)
        mask, offsets = lookahead_mask(past, W, N, G_now, model.dtype, device)
        tokens = [current] + [t for level in window for t in level] + [t for c in candidates for t in c]
        ids = torch.tensor([tokens], device=device)
        position_ids = torch.tensor([offsets], device=device) + past
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                    use_cache=True)
        stats.steps += 1
        greedy = out.logits[0].argmax(dim=-1).tolist()

        # Verification: the longest candidate prefix that greedy decoding would produce.
        accepted, best_g = [greedy[0]], -1
        base = 1 + levels * W
        for g, cand in enumerate(candidates):
            run = [greedy[0]]
            for j in range(levels):
                if cand[j] != run[-1]:
                    break
                run.append(greedy[base + g * levels + j])
            if len(run) > len(accepted):
                accepted, best_g = run, g

        # Lookahead branch: harvest n-grams, shift the levels, top level <- new guesses.
        top = [greedy[1 + (levels - 1) * W + col] for col in range(W)]
        for col in range(W):
            stats.add(tuple(window[l][col] for l in range(levels)) + (top[col],), G)
        window = window[1:] + [top]

        # Cache: keep c and the accepted candidate tokens, drop everything else.
        start = past + base + max(best_g, 0) * levels  # candidate slots lie after the window: no overlap
        keep_accepted(cache, past, start, len(accepted) - 1 if best_g >= 0 else 0)

        before = len(state.tokens)
        done = state.emit(accepted)
        stats.pool_hits += max(0, len(state.tokens) - before - 1)
        if done:
            return
        current = accepted[-1]


@register
class LookaheadMethod(Method):
    spec = MethodSpec(
        name="lookahead",
        title="Lookahead decoding",
        modalities=("text",),
        families=("causal-lm",),
        summary="Jacobi iterations propose n-grams that are verified in the same forward; exact greedy output.",
        paper="Fu et al. 2024, Break the Sequential Dependency of LLM Inference Using Lookahead Decoding (ICML)",
        lossless=True,
        params=(
            Param("window", "int", 4, min=1, max=16,
                  help="W: Jacobi positions guessed ahead; wider finds more n-grams but each forward is wider"),
            Param("ngram", "int", 4, min=2, max=8, help="N: n-gram size, at most N tokens accepted per forward"),
            Param("branches", "int", 4, min=0, max=16, help="G: pool n-grams verified per forward"),
            Param("prompt_ngrams", "bool", True, help="seed the n-gram pool with the prompt (pays on copy-heavy text)"),
        ),
        conflicts=tuple(m for m in DECODING_METHODS if m != "lookahead"),
    )

    def apply(self, backend) -> None:
        self.state = LookaheadState()
        self.config = LookaheadConfig(**self.params)
        self._extra: dict[str, Any] = {}

    def prepare_call(self, backend, call: dict[str, Any]) -> dict[str, Any]:
        require_greedy(call, "lookahead decoding")
        self._extra = call["_extra"]
        self.state.reset()

        def decoder(backend, input_ids, state):
            lookahead_decode(backend, input_ids, state, self.config, self.state)

        return set_decoder(call, decoder, "lookahead decoding")

    def stats(self) -> dict[str, Any]:
        stats = decoding_stats(self._extra)
        stats.update(pool_ngrams=self.state.pool_size, accepted_from_pool=self.state.pool_hits,
                     lookahead_steps=self.state.steps)
        return stats

    def warnings(self, backend, call) -> list[str]:
        q = 1 + (self.config.ngram - 1) * (self.config.window + self.config.branches)
        if q > 40:
            return [f"lookahead forwards are {q} tokens wide; on CPU such forwards cost well over 2x a "
                    "one-token forward, so the speed-up needs more than ~2.5 accepted tokens per step"]
        return []
