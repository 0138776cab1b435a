"""Token Recycling (Luo et al. 2024, "Turning Trash into Treasure: Accelerating Inference of
Large Language Models with Token Recycling"): the candidate tokens every forward computes
and plain decoding throws away are kept and become the next drafts.

An adjacency matrix of ``vocab x k`` token ids holds, for each token, the ``k`` likeliest
next tokens the last forward that read that token predicted after it (its logits' top-k).
Every forward refreshes the rows of every token it was fed (the prompt's, then the
current token's and the draft tree's). Drafts: a static tree template (``tree_template``:
paths of candidate ranks, e.g. ``(0, 1)`` = the best candidate after the current token,
then the second best after that one) filled by a breadth-first walk of the matrix, verified
in one forward with tree attention (``backends.accel._tree_decoding``); the accepted path
is the target's own greedy choices, so the output is plain greedy decoding, exactly.

The matrix lives on the backend (``run_memory``), one per loaded model, and persists
across runs (``vocab * k * 4`` bytes: 128 KiB for the bundled 4,096-token model at k 8;
under 2 MB for a 32k vocabulary at k 8, as in the paper); unloading the model drops it.
Greedy only. On one CPU thread a forward's cost grows with its width, so the default tree
is far smaller than the paper's ~80 nodes (GPU).
"""

from __future__ import annotations

import functools
import heapq
import math
from typing import Any

import torch

from backends.accel.base import Limits, Method, MethodConfig, MethodSpec, param, register
from backends.accel._decoding import DecodingHandle, require_greedy, set_decoder
from backends.accel._tree_decoding import TreeStats, tree_decode
from backends.accel.lookahead import candidate_tree
from backends.plan import DecodingPlan
from backends.types import ValidationError

MEMORY_KEY = "token_recycling"


class TokenRecyclingConfig(MethodConfig):
    """Defaults measured on one CPU thread (README); the paper's tree is much larger (GPU)."""

    k: int = param(8, min=1, max=32, help="candidates kept per token in the adjacency matrix (its width)")
    tree_size: int = param(12, min=1, max=128, paper=80,
                           help="draft tokens per forward (tree nodes); CPU: 8-16, GPU: up to ~80")
    depth: int = param(6, min=1, max=16, help="longest draft path (tokens accepted per forward at most depth + 1)")
    persist: bool = param(True, help="keep the matrix across runs of this model (off: every run starts from an "
                                     "empty matrix, what a first request sees)")


@functools.lru_cache(maxsize=64)
def tree_template(size: int, depth: int, k: int) -> tuple[tuple[int, ...], ...]:
    """The ``size`` heaviest paths of candidate ranks, parents first: a path weighs the
    product over its steps of 1/(rank + 1), discounted by 1% a step, so the best candidates
    are followed deepest and the second and third ones get short branches (the shape of the
    paper's static tree). Every prefix of a path is in the template (it weighs more)."""
    heap: list[tuple[float, tuple[int, ...]]] = [(-math.log(1.0 / (r + 1)) + 0.01, (r,)) for r in range(k)]
    heapq.heapify(heap)
    chosen: list[tuple[int, ...]] = []
    while heap and len(chosen) < size:
        cost, path = heapq.heappop(heap)
        chosen.append(path)
        if len(path) < depth:
            for r in range(k):
                heapq.heappush(heap, (cost - math.log(1.0 / (r + 1)) + 0.01, path + (r,)))
    return tuple(sorted(chosen, key=lambda p: (len(p), p)))


class AdjacencyMatrix:
    """``vocab x k`` next-token candidates, refreshed from every forward's logits."""

    def __init__(self, vocab: int, k: int):
        self.k = k
        self.rows = torch.zeros(vocab, k, dtype=torch.int32)
        self.seen = torch.zeros(vocab, dtype=torch.bool)
        self.updates = 0

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size() + self.seen.numel()

    def update(self, tokens: list[int], logits: torch.Tensor) -> None:
        top = logits.float().topk(self.k, dim=-1).indices.to("cpu", torch.int32)
        index = torch.tensor(tokens, dtype=torch.long)
        self.rows[index] = top  # a token fed twice keeps its last row, as in the paper
        self.seen[index] = True
        self.updates += len(tokens)

    def draft(self, current: int, template: tuple[tuple[int, ...], ...]):
        """The template filled by a breadth-first walk: the node at path (r1, ..., rn) is
        candidate rn of the node at (r1, ..., rn-1). Rows never written propose nothing."""
        token_at: dict[tuple[int, ...], int] = {(): current}
        candidates = []
        for path in template:
            parent = token_at.get(path[:-1])
            if parent is None or not bool(self.seen[parent]):
                continue
            token_at[path] = int(self.rows[parent, path[-1]])
            candidates.append(tuple(token_at[path[:i]] for i in range(1, len(path) + 1)))
        return candidate_tree(_leaves(candidates))


def _leaves(paths: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Paths not a prefix of another (the tree merge rebuilds the shared prefixes)."""
    prefixes = {p[:i] for p in paths for i in range(1, len(p))}
    return [p for p in paths if p not in prefixes]


def recycling_matrix(backend, k: int, persist: bool = True) -> AdjacencyMatrix:
    """The backend's matrix for this ``k`` (a new ``k`` starts a new matrix); a fresh,
    unkept one when ``persist`` is off."""
    vocab = int(backend.model.get_output_embeddings().weight.shape[0])
    if not persist:
        return AdjacencyMatrix(vocab, k)
    memory = getattr(backend, "run_memory", None)
    if memory is None:
        raise ValidationError("token recycling needs a text backend that keeps state across runs")
    matrix = memory.get(MEMORY_KEY)
    if matrix is None or matrix.k != k or matrix.rows.shape[0] != vocab:
        matrix = memory[MEMORY_KEY] = AdjacencyMatrix(vocab, k)
    return matrix


@register
class TokenRecyclingMethod(Method):
    spec = MethodSpec(
        name="token_recycling",
        title="Token Recycling",
        modalities=("text",),
        families=("causal-lm",),
        summary="Drafts from an adjacency matrix of the top-k tokens past forwards predicted (kept across runs), "
                "verified as a tree in one forward; exact greedy output.",
        paper="Luo et al. 2024, Turning Trash into Treasure: Accelerating Inference of Large Language Models with "
              "Token Recycling",
        lossless=True,
        config=TokenRecyclingConfig,
        slots=("decoder",),
        defaults_note="a small tree measured on one CPU thread; the paper's ~80-node tree suits a GPU",
    )

    @classmethod
    def limits(cls, backend) -> Limits:
        """A tree holds at least one full path: tree_size >= depth (any model)."""
        return Limits(ranges={"tree_size": ("depth", None)})

    def attach(self, backend, plan: DecodingPlan) -> DecodingHandle:
        require_greedy(plan, "token recycling")
        config = self.config
        matrix = recycling_matrix(backend, config.k, config.persist)
        template = tree_template(config.tree_size, config.depth, config.k)
        run = TreeStats()
        updates_before = matrix.updates

        def decode(b, ids, state):
            tree_decode(b, ids, state, lambda _seq, current: matrix.draft(current, template), run, matrix.update)

        set_decoder(plan, decode, "token recycling")

        def stats() -> dict[str, Any]:
            return {**run.as_dict(), "matrix_rows_seen": int(matrix.seen.sum()),
                    "matrix_updates": matrix.updates - updates_before, "matrix_bytes": matrix.nbytes}

        return DecodingHandle(plan, stats)
