"""A draft-tree decoding loop shared by the draft-free tree methods (Token Recycling,
retrieval drafting): a proposer hands a token tree for the current token, the target
scores ``[current, *tree]`` in one forward with tree attention, and the longest path
whose every node is the model's own greedy choice at its parent is accepted.

The tree attention, the tree merge and the cache compaction are lookahead's
(``backends.accel.lookahead``: ``candidate_tree``, ``additive_mask``, ``keep_accepted``),
so every tree method verifies the same way, and exactly: the token after each accepted
node is the target's argmax there, so the output is plain greedy decoding, token for
token (greedy only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from backends.accel._decoding import DecodeState
from backends.accel.lookahead import additive_mask, keep_accepted

Node = tuple[int, int, int]  # (token, parent index or -1 for the current token, depth from 0)
# propose(sequence so far, current token) -> (nodes parents-first, (parent, token) -> node)
Proposer = Callable[[list[int], int], tuple[list[Node], dict[tuple[int, int], int]]]
# observe(tokens fed, their logits (len(tokens), vocab)): what a forward saw, for methods that learn from it
Observer = Callable[[list[int], torch.Tensor], None]


@dataclass
class TreeStats:
    """One run's figures: forwards after the prompt's, tokens accepted beyond the one a
    forward always gives, and the tokens fed (the forward width a CPU pays for)."""

    steps: int = 0
    accepted_from_tree: int = 0
    forward_tokens: int = 0
    tree_nodes: int = 0

    def as_dict(self) -> dict[str, float]:
        out = {"tree_steps": self.steps, "accepted_from_tree": self.accepted_from_tree}
        if self.steps:
            out["mean_forward_width"] = round(self.forward_tokens / self.steps, 2)
            out["mean_accepted_per_step"] = round(1 + self.accepted_from_tree / self.steps, 3)
        return out


def tree_mask(nodes: list[Node]) -> torch.Tensor:
    """(1 + n, 1 + n) bool: the current token sees itself, a node the current token, its
    ancestors and itself (parents come before children)."""
    q = 1 + len(nodes)
    allowed = torch.zeros(q, q, dtype=torch.bool)
    allowed[:, 0] = True
    for i, (_, parent, _) in enumerate(nodes):
        row = 1 + i
        if parent >= 0:
            allowed[row] = allowed[1 + parent]
        allowed[row, row] = True
    return allowed


def tree_decode(backend, input_ids: torch.Tensor, state: DecodeState, propose: Proposer, stats: TreeStats,
                observe: Observer | None = None, cache=None) -> None:
    """Greedy decoding with draft trees from ``propose``; ``observe`` sees every forward's
    tokens and logits (the prompt's too). ``cache``: a cache already holding a prefix of
    the prompt (the rest is computed here)."""
    from transformers import DynamicCache

    model = backend.model
    device = input_ids.device
    cache = cache if cache is not None else DynamicCache(config=model.config)
    done = cache.get_seq_length()
    out = model(input_ids=input_ids[:, done:], past_key_values=cache, use_cache=True)
    if observe is not None:
        observe(input_ids[0, done:].tolist(), out.logits[0])
    current = int(out.logits[0, -1].argmax())
    if state.emit([current]):
        return
    sequence = input_ids[0].tolist() + [current]
    while True:
        past = cache.get_seq_length()
        nodes, children = propose(sequence, current)
        tokens = [current] + [t for t, _, _ in nodes]
        mask = additive_mask(tree_mask(nodes), past, model.dtype, device)
        positions = torch.tensor([[0] + [1 + depth for _, _, depth in nodes]], device=device) + past
        out = model(input_ids=torch.tensor([tokens], device=device), attention_mask=mask, position_ids=positions,
                    past_key_values=cache, use_cache=True)
        logits = out.logits[0]
        if observe is not None:
            observe(tokens, logits)
        greedy = logits.argmax(dim=-1).tolist()
        accepted, path, node = [greedy[0]], [], -1
        while (node := children.get((node, accepted[-1]), -1)) >= 0:
            path.append(node)
            accepted.append(greedy[1 + node])
        keep_accepted(cache, past, [past + 1 + i for i in path])
        stats.steps += 1
        stats.forward_tokens += len(tokens)
        stats.tree_nodes += len(nodes)
        before = len(state.tokens)
        finished = state.emit(accepted)
        stats.accepted_from_tree += max(0, len(state.tokens) - before - 1)
        if finished:
            return
        sequence += accepted
        current = accepted[-1]
