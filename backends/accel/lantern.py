"""LANTERN (Jang et al. 2024, "LANTERN: Accelerating Visual Autoregressive Models with Relaxed
Speculative Decoding"), here on top of speculative Jacobi decoding (``sjd.py``).

Image models spread their probability over many interchangeable codes (token selection
ambiguity), so a draft is often rejected although a code that paints nearly the same patch
was likely. LANTERN relaxes the acceptance test: a draft ``x`` counts as likely as itself
plus its nearest neighbours in the tokenizer's latent space, ``p~(x) = p(x) + sum of p over
the first neighbours``, taking neighbours (nearest first, at most ``k``) only while the
mass moved stays within ``delta`` (the total-variation bound between ``p`` and the relaxed
distribution). ``x`` is then kept with probability ``min(1, p~(x) / q(x))``; a rejected
draft is replaced from ``norm(max(0, p - q))`` as in SJD. Lossy, by at most ``delta`` in
total variation per token; ``delta = 0`` is SJD exactly.

Neighbours: cosine distance between the VQ codebook's (l2-normalised) code vectors,
computed from the loaded tokenizer once per model and ``k`` (``neighbours_of``).
"""

from __future__ import annotations

from typing import Any

import torch

from backends.accel._ar_decoding import AR_FAMILY, AR_SLOT, loaded_layout, uniform
from backends.accel.base import Limits, Method, MethodConfig, MethodSpec, param, register
from backends.accel.sjd import AcceptRule, ARLoopHandle, attach_loop, sjd_loop
from backends.plan import ARImagePlan


NEIGHBOUR_ROWS = 2048  # codes per block of the similarity matrix (Janus: 2048 x 16,384 floats, 128 MiB)
KEPT_NEIGHBOUR_SETS = 4  # k values whose neighbours a loaded model keeps (a tune may sweep k)


def latent_neighbours(codes: torch.Tensor, k: int) -> torch.Tensor:
    """(V, k): each code's ``k`` nearest other codes by cosine similarity, nearest first;
    a block of rows at a time, so the whole V x V matrix is never held."""
    unit = torch.nn.functional.normalize(codes.float(), dim=-1)
    k = min(k, len(codes) - 1)
    blocks = []
    for start in range(0, len(unit), NEIGHBOUR_ROWS):
        sim = unit[start:start + NEIGHBOUR_ROWS] @ unit.t()
        rows = torch.arange(len(sim))
        sim[rows, rows + start] = float("-inf")  # not its own neighbour
        blocks.append(sim.topk(k, dim=-1).indices)
    return torch.cat(blocks)


def neighbours_of(pipe: Any, k: int) -> torch.Tensor:
    """``latent_neighbours`` of ``pipe``'s codebook, computed once per loaded model and ``k``
    (Janus's 16,384 codes take seconds each time) and kept on the pipeline object, so they go
    when the model is unloaded; at most ``KEPT_NEIGHBOUR_SETS`` values of ``k``, oldest dropped."""
    kept = vars(pipe).setdefault("_latent_neighbours", {})
    if k not in kept:
        while len(kept) >= KEPT_NEIGHBOUR_SETS:
            kept.pop(next(iter(kept)))
        kept[k] = latent_neighbours(pipe.codebook_vectors().detach().cpu(), k)
    return kept[k]


def neighbour_limits(backend: Any) -> Limits:
    """``k`` neighbours: at most the codebook size less the code itself (255 of the bundled
    model's 256 codes; Janus's 16,384 leave the Config's 1,024)."""
    layout = loaded_layout(backend)
    return Limits(ranges={"k": (None, layout.codebook_size - 1)}) if layout is not None else Limits()


def relaxed_accept(neighbours: torch.Tensor, delta: float) -> AcceptRule:
    def accept(p: torch.Tensor, q: torch.Tensor, x: int, gen: torch.Generator) -> bool:
        moved = p[neighbours[x]].cumsum(0)
        extra = float(moved[moved <= delta][-1]) if bool((moved <= delta).any()) else 0.0
        return uniform(gen) * float(q[x]) < float(p[x]) + extra

    return accept


class LanternConfig(MethodConfig):
    window: int = param(16, min=1, max=64, help="draft tokens verified per forward (as in sjd)")
    k: int = param(16, min=1, max=1024, paper=1000,
                   help="latent neighbours a draft may borrow probability from (paper: 1000 of LlamaGen's 16384 "
                        "codes, ~6%; 16 of this codebook's 256)")
    delta: float = param(0.2, min=0.0, max=1.0, step=0.05,
                         help="total-variation bound: most probability moved onto a draft (0 = plain SJD)")


@register
class LanternMethod(Method):
    spec = MethodSpec(
        name="lantern",
        title="LANTERN (relaxed acceptance, on SJD)",
        modalities=("image",),
        families=(AR_FAMILY,),
        summary="Speculative Jacobi decoding whose acceptance also counts the probability of a draft's "
                "latent-space neighbours, within a total-variation bound: more tokens per forward, lossy.",
        paper="Jang et al. 2024, LANTERN: Accelerating Visual Autoregressive Models with Relaxed Speculative "
              "Decoding (ICLR 2025)",
        lossless=False,
        config=LanternConfig,
        slots=(AR_SLOT,),
        defaults_note="k is the paper's share of the codebook (1000 of LlamaGen's 16384 codes, ~6%) on this "
                      "model's 256 codes",
    )

    @classmethod
    def limits(cls, backend: Any) -> Limits:
        return neighbour_limits(backend)

    def attach(self, backend: Any, plan: ARImagePlan) -> ARLoopHandle:
        cfg = self.config
        accept = relaxed_accept(neighbours_of(backend.pipe, cfg.k), cfg.delta)
        return attach_loop(plan, lambda stats: lambda session, progress: sjd_loop(
            session, progress, cfg.window, accept=accept, stats=stats))
