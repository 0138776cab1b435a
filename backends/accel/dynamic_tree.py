"""Dynamic draft trees (Li et al. 2024, "EAGLE-2: Faster Inference of Language Models with
Dynamic Draft Trees"; Xiong et al. 2024, "DySpec: Faster Speculative Decoding with Dynamic
Token Tree Structure"): the draft model grows the tree where it is confident.

A static tree spends the same branches on every step; here the draft model (the target's
paired one, as in speculative decoding) expands, level by level, the ``width`` nodes whose
path probability (the product of the draft's probabilities along it) is highest, each into
its ``branch`` likeliest next tokens; after ``depth`` levels the ``tree_size`` most probable
nodes of everything drafted (a parent is always at least as probable as its child, so the
selection is a tree) are verified by the target in one forward with tree attention
(``backends.accel._tree_decoding``). A confident draft thus builds a deep, narrow tree and
an unsure one a wide, shallow one. Each level is one draft forward over the frontier with
a tree mask over the draft's own cache, which is cut back to the accepted text after every
step. Greedy only; the output is the target's greedy decoding, exactly.
"""

from __future__ import annotations

import heapq
from typing import Any

import torch

from backends.accel.base import Limits, Method, MethodConfig, MethodSpec, param, register
from backends.accel._decoding import DecodingHandle, crop_cache, require_greedy, set_decoder
from backends.accel._tree_decoding import TreeStats, tree_decode
from backends.accel.lookahead import candidate_tree
from backends.accel.speculative import check_same_vocab, paired_draft_limits
from backends.catalog import bundled
from backends.plan import DecodingPlan
from backends.types import ValidationError


class DynamicTreeConfig(MethodConfig):
    """Defaults sized for one CPU thread; EAGLE-2 drafts 6 levels of 10 and verifies 60 nodes."""

    draft: str = param("auto", choices=("auto", *(m.name for m in bundled("text", available_only=False))),
                       help="draft model; 'auto' = the model's paired draft")
    depth: int = param(4, min=1, max=12, paper=6, help="draft levels (draft forwards per step)")
    width: int = param(3, min=1, max=16, paper=10, help="most probable nodes expanded per level")
    branch: int = param(3, min=1, max=16, help="children drafted per expanded node")
    tree_size: int = param(10, min=1, max=128, paper=60, help="most probable drafted nodes verified per forward")


class DraftTree:
    """The draft model's side of one run: its cache holds the accepted text (up to the
    current token, which it has not seen yet) and, during a step, the drafted levels."""

    def __init__(self, draft, config: DynamicTreeConfig, device):
        from transformers import DynamicCache

        self.draft, self.config, self.device = draft, config, device
        self.cache = DynamicCache(config=draft.config)
        self.forwards = 0

    def forward(self, tokens: list[int], positions: list[int], mask: torch.Tensor | None) -> torch.Tensor:
        self.forwards += 1
        out = self.draft(input_ids=torch.tensor([tokens], device=self.device), past_key_values=self.cache,
                         position_ids=torch.tensor([positions], device=self.device), attention_mask=mask,
                         use_cache=True)
        return out.logits[0].float().log_softmax(-1)

    def propose(self, sequence: list[int], _current: int):
        """Grow the tree for the last token of ``sequence``; returns lookahead's tree form."""
        config = self.config
        committed = self.cache.get_seq_length()
        pending = sequence[committed:]  # the accepted tokens the draft has not read (the current one at least)
        logp = self.forward(pending, list(range(committed, len(sequence))), None)[-1]
        base = len(sequence)  # the draft cache's length once the pending tokens are in
        # candidates: (path log-probability, path of tokens); frontier nodes carry their cache slot
        drafted: list[tuple[float, tuple[int, ...]]] = []
        frontier = [(0.0, (), None)]  # (score, path, slot of its last token in the draft cache)
        level_logp = [logp]
        slots: dict[tuple[int, ...], int] = {}
        for level in range(config.depth):
            children = []
            for (score, path, _), dist in zip(frontier, level_logp):
                top = dist.topk(config.branch)
                for value, token in zip(top.values.tolist(), top.indices.tolist()):
                    children.append((score + value, path + (int(token),)))
            drafted.extend(children)
            if level == config.depth - 1:
                break
            best = heapq.nlargest(config.width, children, key=lambda c: c[0])
            start = base + len(slots)
            for i, (_, path) in enumerate(best):
                slots[path] = start + i
            mask = self.level_mask(best, slots, base, start)
            level_logp = list(self.forward([p[-1] for _, p in best], [base - 1 + len(p) for _, p in best], mask))
            frontier = [(s, p, slots[p]) for s, p in best]
        crop_cache(self.cache, base)  # the drafted levels go; the accepted text stays
        chosen = heapq.nlargest(config.tree_size, drafted, key=lambda c: c[0])
        kept = {p for _, p in chosen}
        chosen = [p for _, p in chosen if all(p[:i] in kept for i in range(1, len(p)))]
        inner = {p[:i] for p in chosen for i in range(1, len(p))}
        return candidate_tree([p for p in chosen if p not in inner])

    def level_mask(self, nodes, slots: dict[tuple[int, ...], int], base: int, start: int) -> torch.Tensor:
        """(1, 1, q, start + q) additive mask: a new node sees the accepted text, its own
        drafted ancestors (at their cache slots) and itself."""
        dtype = self.draft.dtype
        q = len(nodes)
        mask = torch.full((q, start + q), torch.finfo(dtype).min, dtype=dtype)
        mask[:, :base] = 0
        for row, (_, path) in enumerate(nodes):
            for i in range(1, len(path)):
                mask[row, slots[path[:i]]] = 0
            mask[row, start + row] = 0
        return mask[None, None].to(self.device)


@register
class DynamicTreeMethod(Method):
    spec = MethodSpec(
        name="dynamic_tree",
        title="Dynamic draft trees (draft model)",
        modalities=("text",),
        families=("causal-lm",),
        summary="The draft model grows a token tree where it is confident (most probable paths expanded), the "
                "target verifies it in one forward; exact greedy output.",
        paper="Li et al. 2024, EAGLE-2: Faster Inference of Language Models with Dynamic Draft Trees (EMNLP); "
              "Xiong et al. 2024, DySpec: Faster Speculative Decoding with Dynamic Token Tree Structure",
        lossless=True,
        config=DynamicTreeConfig,
        slots=("decoder",),
        defaults_note="a small tree sized for one CPU thread; the papers' wider trees suit a GPU",
    )

    @classmethod
    def limits(cls, backend) -> Limits:
        return paired_draft_limits(cls, backend)

    def attach(self, backend, plan: DecodingPlan) -> DecodingHandle:
        require_greedy(plan, "dynamic draft trees")
        config = self.config
        draft_id = backend.draft_id if config.draft == "auto" else config.draft
        if not draft_id:
            raise ValidationError(f"model '{backend.model_id}' has no paired draft model; choose one in the "
                                  "method's 'draft' setting")
        draft, draft_tokenizer = backend.get_draft(draft_id)
        check_same_vocab(backend.tokenizer, backend.model, draft_tokenizer, draft, draft_id)
        run = TreeStats()
        holder: dict[str, Any] = {}

        def decode(b, ids, state):
            holder["tree"] = tree = DraftTree(draft, config, ids.device)
            tree_decode(b, ids, state, tree.propose, run)

        set_decoder(plan, decode, "dynamic draft trees")

        def stats() -> dict[str, Any]:
            tree = holder.get("tree")
            return {**run.as_dict(), "draft": draft_id, "draft_forwards": tree.forwards if tree else 0}

        return DecodingHandle(plan, stats)
