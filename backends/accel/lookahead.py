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
- the *verification branch*: up to ``G`` pool n-grams keyed by ``c``, merged into a token
  tree (shared prefixes once), each node attending to the prefix, ``c`` and its ancestors.

The pool is fed by the Jacobi window, and (both on by default) by the prompt's n-grams and
the output's own as it grows: code repeats its identifiers and idioms, and those n-grams
cost no forward width. The output at ``c`` is the next token (always correct); the tree
is followed while each node equals the model's own greedy choice at its parent, so the
output is token-for-token plain greedy decoding, up to ``N`` tokens per forward. The K/V
of the accepted path are kept (gathered from their scattered positions), the rest of the
forward's entries are dropped from the cache. Logits are computed only where they are
read (``c``, the window's top level, the tree).

Greedy only. On one CPU thread a forward's cost grows with its width (a 10-token forward
of the bundled 12-layer model costs ~1.5x a one-token one, 18 tokens ~1.75x), so small
windows (W 1-3, N 4, G 2-4) are the ones that pay there; on a GPU, where width is nearly
free up to tens of tokens, the paper's larger settings (W 15, N 5, G 15) are the ones to try.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.accel._decoding import DecodeState, DecodingHandle, require_greedy, set_decoder
from backends.plan import DecodingPlan


class LookaheadConfig(MethodConfig):
    """The defaults were measured fastest on one CPU thread (README); a GPU affords the
    paper's wider settings, where a wide forward costs about as much as a narrow one."""

    window: int = param(2, min=1, max=16, paper=15,
                        help="W: Jacobi positions guessed ahead; wider finds more n-grams but each forward is "
                             "wider (CPU: 1-2; GPU: up to 15)")
    ngram: int = param(4, min=2, max=8, paper=5, help="N: n-gram size, at most N tokens accepted per forward")
    branches: int = param(4, min=0, max=16, paper=15, help="G: pool n-grams verified per forward")
    prompt_ngrams: bool = param(True, help="seed the n-gram pool with the prompt (cheap; pays on copy-heavy text "
                                           "such as code editing)")
    output_ngrams: bool = param(True, help="add the output's own n-grams to the pool as it grows (code repeats "
                                           "its identifiers; costs no forward width)")


@dataclass
class LookaheadState:
    steps: int = 0
    pool_hits: int = 0  # tokens accepted from verified n-grams (beyond the one per step)
    pool_size: int = 0
    forward_tokens: int = 0  # tokens fed to the target, all forwards after the prompt's
    pool: dict[int, list[tuple[int, ...]]] = field(default_factory=dict)

    def reset(self) -> None:
        self.steps = self.pool_hits = self.pool_size = self.forward_tokens = 0
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

    def add_ngrams(self, seq: list[int], n: int, cap: int, first_end: int = 0) -> None:
        """Add the ``n``-grams of ``seq`` that end at position ``first_end`` or later."""
        for end in range(max(n, first_end), len(seq) + 1):
            self.add(tuple(seq[end - n:end]), cap)


@functools.lru_cache(maxsize=64)
def _window_layout(W: int, N: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Which of ``c`` and the window's ``(N-1) x W`` tokens sees which (bool), and their
    position offsets from ``c``: column ``i`` reads ``c, a0[0..i], a1[i], ..., a{N-2}[i]``."""
    levels = N - 1
    q = 1 + levels * W
    allowed = torch.zeros(q, q, dtype=torch.bool)
    allowed[:, 0] = True
    offsets = [0]
    for level in range(levels):
        for col in range(W):
            row = 1 + level * W + col
            offsets.append(1 + col + level)
            allowed[row, 1: 2 + col] = True  # level 0, columns 0..col
            for lv in range(1, level + 1):
                allowed[row, 1 + lv * W + col] = True
    return allowed, tuple(offsets)


def candidate_tree(candidates: list[tuple[int, ...]]) -> tuple[list[tuple[int, int, int]], dict]:
    """Merge candidates into a token tree: nodes ``(token, parent, depth)`` (parent -1 =
    the current token), parents before children, and ``(parent, token) -> node``. Shared
    prefixes are verified once, so more candidates fit in the same forward width."""
    nodes: list[tuple[int, int, int]] = []
    index: dict[tuple[int, int], int] = {}
    for cand in candidates:
        parent = -1
        for depth, token in enumerate(cand):
            key = (parent, token)
            if key not in index:
                index[key] = len(nodes)
                nodes.append((token, parent, depth))
            parent = index[key]
    return nodes, index


def additive_mask(allowed: torch.Tensor, past: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(1, 1, q, past + q) additive attention mask: every new token sees the whole cache,
    and new token i sees new token j where ``allowed[i, j]``."""
    q = allowed.shape[0]
    mask = torch.zeros(q, past + q, dtype=dtype)
    mask[:, past:].masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None].to(device)


def lookahead_mask(past: int, W: int, N: int, nodes: list[tuple[int, int, int]], dtype: torch.dtype,
                   device) -> tuple[torch.Tensor, list[int]]:
    """Additive 4-D mask (1, 1, q, past + q) and position offsets for ``c``, the window and
    the candidate tree: every new token sees the whole cache, a window token what
    ``_window_layout`` allows, a tree node ``c`` and its own ancestors."""
    window, offsets = _window_layout(W, N)
    base, q = window.shape[0], window.shape[0] + len(nodes)
    allowed = torch.zeros(q, q, dtype=torch.bool)
    allowed[:base, :base] = window
    allowed[base:, 0] = True
    for i, (_, parent, _) in enumerate(nodes):
        allowed[base + i, base + i] = True
        if parent >= 0:
            allowed[base + i, base: base + parent + 1] = allowed[base + parent, base: base + parent + 1]
    return additive_mask(allowed, past, dtype, device), list(offsets) + [1 + depth for _, _, depth in nodes]


def keep_accepted(cache, past: int, kept: list[int]) -> None:
    """Keep the cache up to ``c`` (``past + 1`` entries) plus the entries at ``kept`` (the
    accepted tree path's, ascending), moved right after ``c``; the rest is dropped."""
    count = len(kept)
    index = torch.tensor(kept, dtype=torch.long) if count else None
    for layer in cache.layers:
        if count:
            index = index.to(layer.keys.device)
            layer.keys[..., past + 1: past + 1 + count, :] = layer.keys.index_select(-2, index)
            layer.values[..., past + 1: past + 1 + count, :] = layer.values.index_select(-2, index)
        layer.keys = layer.keys[..., : past + 1 + count, :]
        layer.values = layer.values[..., : past + 1 + count, :]


def lookahead_decode(backend, input_ids: torch.Tensor, state: DecodeState, config: LookaheadConfig,
                     stats: LookaheadState) -> None:
    from transformers import DynamicCache

    model = backend.model
    W, N, G = config.window, config.ngram, config.branches
    levels = N - 1
    base = 1 + levels * W  # the tree's first slot in every forward
    top = list(range(1 + (levels - 1) * W, base))  # the window's top level: next Jacobi guesses
    device = input_ids.device
    prompt = input_ids[0].tolist()
    if config.prompt_ngrams:
        stats.add_ngrams(prompt, N, G)

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
        nodes, children = candidate_tree(stats.pool.get(current, [])[-G:])  # every entry is N - 1 long
        mask, offsets = lookahead_mask(past, W, N, nodes, model.dtype, device)
        tokens = [current] + [t for level in window for t in level] + [t for t, _, _ in nodes]
        # logits only where they are read: c, the top level, the tree (the lower levels' are not)
        keep = [0] + top + list(range(base, base + len(nodes)))
        out = model(input_ids=torch.tensor([tokens], device=device), attention_mask=mask,
                    position_ids=torch.tensor([offsets], device=device) + past, past_key_values=cache,
                    use_cache=True, logits_to_keep=torch.tensor(keep, device=device))
        stats.steps += 1
        stats.forward_tokens += len(tokens)
        picked = out.logits[0].argmax(dim=-1).tolist()
        greedy = dict(zip(keep, picked))

        # Verification: follow the tree while each node is the model's greedy choice at its parent.
        accepted, path, node = [greedy[0]], [], -1
        while (node := children.get((node, accepted[-1]), -1)) >= 0:
            path.append(node)
            accepted.append(greedy[base + node])

        # Lookahead branch: harvest n-grams, shift the levels, top level <- new guesses.
        guesses = [greedy[i] for i in top]
        for col in range(W):
            stats.add(tuple(window[l][col] for l in range(levels)) + (guesses[col],), G)
        window = window[1:] + [guesses]

        # Cache: keep c and the accepted path's tokens, drop everything else.
        keep_accepted(cache, past, [past + base + i for i in path])

        before = len(state.tokens)
        done = state.emit(accepted)
        stats.pool_hits += max(0, len(state.tokens) - before - 1)
        if done:
            return
        if config.output_ngrams:
            text = prompt[-N:] + state.tokens if len(state.tokens) < N else state.tokens
            stats.add_ngrams(text, N, G, first_end=len(text) - len(accepted) + 1)
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
        config=LookaheadConfig,
        slots=("decoder",),
        defaults_note="settings measured fastest on one CPU thread; on the paper's GPUs a wide forward costs "
                      "about as much as a narrow one",
    )

    def attach(self, backend, plan: DecodingPlan) -> DecodingHandle:
        require_greedy(plan, "lookahead decoding")
        run = LookaheadState()
        set_decoder(plan, lambda b, ids, state: lookahead_decode(b, ids, state, self.config, run),
                    "lookahead decoding")

        def stats() -> dict[str, Any]:
            own = {"pool_ngrams": run.pool_size, "accepted_from_pool": run.pool_hits, "lookahead_steps": run.steps}
            if run.steps > 1:  # what one forward costs depends on its width: benchmarks time this one
                own["mean_forward_width"] = round(run.forward_tokens / (run.steps - 1), 2)
            return own

        notes = []
        q = 1 + (self.config.ngram - 1) * (self.config.window + self.config.branches)
        if q > 40:
            notes = [f"lookahead forwards are {q} tokens wide; on CPU such forwards cost well over 2x a "
                     "one-token forward, so the speed-up needs more than ~2.5 accepted tokens per step"]
        return DecodingHandle(plan, stats, lambda _plan: notes)
