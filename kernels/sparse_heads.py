"""Per-head sparse attention patterns (Sparse-vDiT, Chen et al. 2025): each head of a
video DiT keeps one fixed, block-granular pattern of key blocks, found offline.

Sparse-vDiT reads the attention maps of video DiTs and finds three recurring patterns,
stable across prompts and tied to the layer and head:

- ``diagonal``: a query attends to its neighbours in the token sequence (raster order,
  time slowest): key blocks ``|kb - qb| <= width``;
- ``multi_diagonal``: the same, repeated once per frame: the same spatial place in every
  frame (temporal attention), key blocks within ``width`` of ``qb + m * frame_blocks``;
- ``vertical_stripe``: every query attends to the same few key blocks (``stripes``) plus
  its own block;
- ``dense``: everything (the fallback when no pattern keeps enough of the mass).

``search_head`` picks, for one head, the cheapest pattern (fewest key blocks kept) whose
attention-mass recall on a calibration run reaches a threshold. The mass is measured per
(query block, key block): ``block_mass`` averages the softmax probabilities of a block's
queries summed over the keys of each key block, so each row sums to 1.

``SparseHeadAttention(masks, block)`` runs attention with one block mask per head: heads
that keep every block go to one fused SDPA call, the others to ``flex_attention``
(compiled; the same compiled function as ``kernels.sta``) with a ``BlockMask`` made only of
*full* blocks (``from_kv_blocks``), so the kernel computes exactly the kept blocks and
skips the rest; the mask function is never evaluated. ``backend="torch"``: the sparse
heads through the reference, dense SDPA with the token-level mask (same result, no saving;
the oracle of the tests and the path where nothing compiles).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

KINDS = ("dense", "diagonal", "multi_diagonal", "vertical_stripe")
BACKENDS = ("auto", "flex", "torch")


@dataclass(frozen=True)
class HeadPattern:
    """One head's pattern. ``width``: half-width in blocks (diagonals); ``stripes``: the key
    blocks every query sees (vertical stripe). ``kept`` and ``recall``: the fraction of key
    blocks it keeps and of the calibration attention mass it covers."""

    kind: str = "dense"
    width: int = 0
    stripes: tuple[int, ...] = field(default_factory=tuple)
    kept: float = 1.0
    recall: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stripes"] = list(self.stripes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HeadPattern":
        if data.get("kind") not in KINDS:
            raise ValueError(f"unknown head pattern {data.get('kind')!r}")
        return cls(data["kind"], int(data.get("width", 0)), tuple(int(s) for s in data.get("stripes", ())),
                   float(data.get("kept", 1.0)), float(data.get("recall", 1.0)))


def pattern_mask(pattern: HeadPattern, blocks: int, frame_blocks: float) -> torch.Tensor:
    """[blocks, blocks] bool: query block i attends to key block j."""
    qb = torch.arange(blocks)[:, None]
    kb = torch.arange(blocks)[None, :]
    offset = (kb - qb).float()
    if pattern.kind == "dense":
        return torch.ones(blocks, blocks, dtype=torch.bool)
    if pattern.kind == "diagonal":
        return offset.abs() <= pattern.width
    if pattern.kind == "multi_diagonal":
        # distance to the nearest frame-multiple offset (0, +-1 frame, +-2 frames ...)
        nearest = torch.round(offset / frame_blocks) * frame_blocks
        return (offset - nearest).abs() <= pattern.width + 1e-6
    if pattern.kind == "vertical_stripe":
        mask = qb == kb
        if pattern.stripes:
            mask = mask | torch.isin(kb, torch.tensor(pattern.stripes)).expand(blocks, blocks)
        return mask
    raise ValueError(f"unknown head pattern {pattern.kind!r}")


def block_mass(probs: torch.Tensor, block: int) -> torch.Tensor:
    """[..., heads, N, N] attention probabilities -> [heads, N/block, N/block]: per query
    block, the mean over its queries of the mass on each key block (rows sum to 1),
    averaged over the leading (batch) dimensions."""
    *lead, heads, n, _ = probs.shape
    nb = n // block
    mass = probs.reshape(-1, heads, nb, block, nb, block).sum(dim=5).mean(dim=3)
    return mass.mean(dim=0)


def attention_block_mass(q: torch.Tensor, k: torch.Tensor, block: int, scale: float | None = None,
                         chunk_tokens: int = 4096) -> torch.Tensor:
    """``block_mass`` of ``softmax(q k^T * scale)`` for ``q, k`` of ``[batch, heads, N, dim]``,
    computed one head and one chunk of query blocks at a time in float32, so the full
    ``N x N`` map of a long video (32k tokens: 4 GB per head) never exists at once."""
    batch, heads, n, _ = q.shape
    nb = n // block
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rows = max(block, chunk_tokens // block * block)
    mass = torch.zeros(heads, nb, nb)
    for h in range(heads):
        for start in range(0, nb * block, rows):
            stop = min(start + rows, nb * block)
            scores = q[:, h, start:stop].float() @ k[:, h, : nb * block].float().transpose(-1, -2) * scale
            probs = scores.softmax(dim=-1)  # [batch, rows, N]
            per = probs.reshape(batch, (stop - start) // block, block, nb, block).sum(dim=4).mean(dim=2)
            mass[h, start // block: stop // block] = per.mean(dim=0).cpu()
    return mass


def _candidates(mass: torch.Tensor, frame_blocks: float) -> list[HeadPattern]:
    """Every pattern worth trying on this head, each family from narrow to wide."""
    nb = mass.shape[0]
    out = [HeadPattern("diagonal", w) for w in range(nb)]
    if frame_blocks and 1 <= frame_blocks < nb:
        out += [HeadPattern("multi_diagonal", w) for w in range(int(math.ceil(frame_blocks / 2)))]
    order = torch.argsort(mass.sum(dim=0), descending=True).tolist()  # key blocks by column mass
    out += [HeadPattern("vertical_stripe", 0, tuple(sorted(order[:k]))) for k in range(nb)]
    return out


def search_head(mass: torch.Tensor, recall: float, frame_blocks: float) -> HeadPattern:
    """The cheapest pattern (fewest key blocks) whose recall of ``mass`` reaches ``recall``;
    dense when none does with fewer blocks than all."""
    total = float(mass.sum())
    best, best_kept = HeadPattern("dense", kept=1.0, recall=1.0), 1.0
    for candidate in _candidates(mass, frame_blocks):  # ties go to the earlier family
        mask = pattern_mask(candidate, mass.shape[0], frame_blocks)
        kept = float(mask.float().mean())
        if kept >= best_kept:
            continue
        covered = float(mass[mask].sum()) / total if total > 0 else 1.0
        if covered >= recall:
            best_kept = kept
            best = HeadPattern(candidate.kind, candidate.width, candidate.stripes, round(kept, 4), round(covered, 4))
    return best


def head_masks(patterns: list[HeadPattern], blocks: int, frame_blocks: float) -> torch.Tensor:
    """[heads, blocks, blocks] bool, one mask per head."""
    return torch.stack([pattern_mask(p, blocks, frame_blocks) for p in patterns])


# ---------------------------------------------------------------------------- kernels


def sparse_reference(q, k, v, masks: torch.Tensor, block: int, scale: float | None = None) -> torch.Tensor:
    """Dense SDPA restricted by the per-head block masks expanded to tokens (the oracle)."""
    token_mask = masks.to(q.device).repeat_interleave(block, dim=1).repeat_interleave(block, dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask[None], scale=scale)


def _keep_all(b, h, q_idx, kv_idx):
    # Every block of the mask is a full block, so the compiled kernel never calls this; one
    # shared function (not a closure per layer) lets every layer reuse one compiled graph.
    return q_idx >= 0


def flex_block_mask(masks: torch.Tensor, block: int, device: torch.device | str):
    """A BlockMask of full blocks only: per head and query block, the kept key blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    heads, nq, nk = masks.shape
    counts = masks.sum(dim=-1).to(torch.int32)
    # kept key blocks first (stable order), then the rest as padding
    order = torch.argsort((~masks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    zeros_num = torch.zeros_like(counts)
    zeros_idx = torch.zeros_like(order)
    return BlockMask.from_kv_blocks(
        zeros_num[None].to(device), zeros_idx[None].to(device), counts[None].to(device), order[None].to(device),
        BLOCK_SIZE=block, mask_mod=_keep_all, seq_lengths=(nq * block, nk * block),
    )


class SparseHeadAttention:
    """Attention with one block mask per head, the heads split once by pattern (Sparse-vDiT's
    head fusion): the dense heads in one fused ``scaled_dot_product_attention`` call, the
    sparse heads in one ``flex_attention`` call over their block mask. Flex on CPU costs
    about 2-3x SDPA per computed block, so a dense head sent through it would cost more
    than it does dense; a head of the layer that keeps every block never goes there."""

    def __init__(self, masks: torch.Tensor, block: int, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.masks, self.block, self.backend = masks.bool(), int(block), backend
        dense = self.masks.flatten(1).all(dim=1)
        self.dense_heads = dense.nonzero().flatten()
        self.sparse_heads = (~dense).nonzero().flatten()
        self.sparse_masks = self.masks[self.sparse_heads]
        self._block_masks: dict[str, Any] = {}

    @property
    def kept(self) -> float:
        return float(self.masks.float().mean())

    def block_mask(self, device: torch.device):
        key = str(device)
        if key not in self._block_masks:
            self._block_masks[key] = flex_block_mask(self.sparse_masks, self.block, device)
        return self._block_masks[key]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        n = q.shape[2]
        if self.masks.shape[1] * self.block != n:
            raise ValueError(f"{n} tokens are not {self.masks.shape[1]} blocks of {self.block}")
        if len(self.sparse_heads) == 0:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if len(self.dense_heads) == 0:
            return self._sparse(q, k, v, scale)
        out = torch.empty_like(q)
        dense, sparse = self.dense_heads.to(q.device), self.sparse_heads.to(q.device)
        out[:, dense] = F.scaled_dot_product_attention(q[:, dense], k[:, dense], v[:, dense], scale=scale)
        out[:, sparse] = self._sparse(q[:, sparse], k[:, sparse], v[:, sparse], scale)
        return out

    def _sparse(self, q, k, v, scale):
        """The sparse heads: compiled flex, else the masked reference (eager flex would
        evaluate every block)."""
        if self.backend == "torch":
            return sparse_reference(q, k, v, self.sparse_masks, self.block, scale)
        from kernels.sta import _FLEX_STATE, _flex_attention, flex_is_compiled

        if not flex_is_compiled():
            return sparse_reference(q, k, v, self.sparse_masks, self.block, scale)
        fn, eager = _flex_attention()
        try:
            return fn(q.contiguous(), k.contiguous(), v.contiguous(), block_mask=self.block_mask(q.device),
                      scale=scale)
        except Exception:  # noqa: BLE001 - no compiler here: from now on the reference
            _FLEX_STATE["fn"], _FLEX_STATE["compiled"] = eager, False
            return sparse_reference(q, k, v, self.sparse_masks, self.block, scale)


def sparse_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: torch.Tensor, block: int,
                          backend: str = "auto", scale: float | None = None) -> torch.Tensor:
    """Attention of ``q`` over ``k, v`` (``[batch, heads, N, dim]``) where head ``h`` sees only
    the key blocks ``masks[h]`` allows (``[heads, N/block, N/block]``). One-off form of
    ``SparseHeadAttention`` (which callers keep, so its block mask is built once)."""
    return SparseHeadAttention(masks, block, backend)(q, k, v, scale)
