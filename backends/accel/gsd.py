"""Grouped speculative decoding (So et al. 2025, "Grouped Speculative Decoding for
Autoregressive Image Generation", ICCV 2025), here on top of speculative Jacobi decoding
(``sjd.py``), as LANTERN (``lantern.py``) is.

Image tokens are redundant (many codes paint nearly the same patch) and diverse (the top-1
probability is often tiny), so testing a draft against its own probability rejects drafts
that are visually valid. GSD tests a draft ``x`` as a member of a cluster instead: the
dynamic group ``G(x)`` is ``x`` plus those of the target's ``group - 1`` most probable
tokens (under ``p`` at that position) that are also latent-space neighbours of ``x`` (its
``k`` nearest VQ codes). The draft is kept with probability ``min(1, p(G) / q(G))``, the
summed target mass of the group over its summed draft mass; a rejected draft is replaced
from ``norm(max(0, p - q))`` as in SJD. Dynamic, because the group follows the target's
distribution at each position (the paper finds static embedding clusters ineffective).
Lossy: a kept draft is a sample of the group, not of the exact token; ``group = 1`` is
plain SJD, bit for bit.

Neighbours: cosine distance between the VQ codebook's code vectors, as in LANTERN.
"""

from __future__ import annotations

from typing import Any

import torch

from backends.accel._ar_decoding import AR_FAMILY, AR_SLOT, loaded_layout, uniform
from backends.accel.base import Limits, Method, MethodConfig, MethodSpec, param, register
from backends.accel.lantern import neighbours_of
from backends.accel.sjd import AcceptRule, ARLoopHandle, attach_loop, sjd_loop


def draft_group(p: torch.Tensor, x: int, neighbours: torch.Tensor, group: int) -> torch.Tensor:
    """Token ids of ``G(x)``: ``x`` first, then the target's most probable tokens among its
    neighbours, at most ``group`` in all (just ``x`` when ``group`` is 1)."""
    if group <= 1:
        return torch.tensor([x])
    top = p.topk(min(group - 1, len(p))).indices
    members = top[torch.isin(top, neighbours[x])]
    return torch.cat([torch.tensor([x]), members[: group - 1]])


def grouped_accept(neighbours: torch.Tensor, group: int) -> AcceptRule:
    """The acceptance test on group sums: keep ``x`` with probability ``min(1, p(G) / q(G))``."""
    def accept(p: torch.Tensor, q: torch.Tensor, x: int, gen: torch.Generator) -> bool:
        members = draft_group(p, x, neighbours, group)
        return uniform(gen) * float(q[members].sum()) < float(p[members].sum())

    return accept


class GSDConfig(MethodConfig):
    window: int = param(16, min=1, max=64, help="draft tokens verified per forward (as in sjd)")
    group: int = param(10, min=1, max=256,
                       help="G: most tokens in a draft's group (the draft plus the target's top tokens "
                            "that are its latent neighbours); 1 = plain SJD")
    k: int = param(16, min=1, max=1024,
                   help="latent neighbours a group member must be among (as lantern's k: ~6% of this "
                        "codebook's 256 codes)")


@register
class GSDMethod(Method):
    spec = MethodSpec(
        name="gsd",
        title="Grouped speculative decoding (on SJD)",
        modalities=("image",),
        families=(AR_FAMILY,),
        summary="Speculative Jacobi decoding that accepts a draft when its dynamic group (the target's most "
                "probable tokens among its latent neighbours) is likely enough: more tokens per forward, lossy.",
        paper="So et al. 2025, Grouped Speculative Decoding for Autoregressive Image Generation (ICCV 2025)",
        lossless=False,
        config=GSDConfig,
        slots=(AR_SLOT,),
        defaults_note="a group of up to 10 among 16 latent neighbours, our choice (the paper's own group size was "
                      "not available to us); group 1 is plain SJD; neighbours by cosine distance of the VQ codes, "
                      "as lantern",
    )

    @classmethod
    def limits(cls, backend: Any) -> Limits:
        """``k``: at most the codebook less the code itself; ``group``: at most the codebook."""
        layout = loaded_layout(backend)
        if layout is None:
            return Limits()
        return Limits(ranges={"k": (None, layout.codebook_size - 1), "group": (None, layout.codebook_size)})

    def attach(self, backend: Any, plan: Any) -> ARLoopHandle:
        cfg = self.config
        accept = grouped_accept(neighbours_of(backend.pipe, cfg.k), cfg.group)
        return attach_loop(plan, lambda stats: lambda session, progress: sjd_loop(
            session, progress, cfg.window, accept=accept, stats=stats))
