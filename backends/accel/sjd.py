"""Speculative Jacobi decoding (Teng et al. 2024, "Accelerating Auto-regressive Text-to-Image
Generation with Training-free Speculative Jacobi Decoding"): parallel Jacobi iterations over
a window of future image tokens, accepted with the speculative-sampling rule, so the output
keeps the model's sampling distribution.

Each iteration is one forward over the last accepted token and a window of ``L`` draft
tokens. Draft ``j`` was drawn from a known distribution ``q_j`` (the model's own output at
that position in the previous iteration, or uniform over the codebook for a fresh position);
the forward gives ``p_j``, the model's distribution there given the tokens before it. The
drafts are checked in order: ``x_j`` is kept with probability ``min(1, p_j(x_j) / q_j(x_j))``;
the first rejected one is replaced by a draw from ``norm(max(0, p_j - q_j))``, which makes
the kept token a sample of ``p_j`` exactly (Leviathan et al.'s lemma); if all are kept, one
more token is drawn from the last output. The positions after the new token are redrawn
from this forward's outputs (the Jacobi update) and become the next window. At least one
token per forward, so never more forwards than plain sampling; on images, where
backgrounds and flat regions repeat, most drafts converge and are kept.

Greedy (temperature 0) is exact token for token; with sampling the distribution is exact
(``tests/test_ar_image.py`` checks it with a chi-square test over many seeds), the tokens
of a given seed differ from plain sampling's because the random draws are spent differently.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from backends.accel._ar_decoding import (
    AR_FAMILY,
    AR_SLOT,
    ARSession,
    LoopStats,
    ProgressFn,
    draw,
    set_ar_decoder,
    uniform,
)
from backends.accel.base import Method, MethodConfig, MethodSpec, param, register
from backends.plan import ARImagePlan, RunHandle

# accept(p, q, x, gen) -> bool: whether draft token x (drawn from q) is kept given the model's p
AcceptRule = Callable[[torch.Tensor, torch.Tensor, int, torch.Generator], bool]


def speculative_accept(p: torch.Tensor, q: torch.Tensor, x: int, gen: torch.Generator) -> bool:
    """Keep ``x`` with probability ``min(1, p(x) / q(x))`` (written without a division)."""
    return uniform(gen) * float(q[x]) < float(p[x])


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(0, p - q))``: where a rejected draft's replacement is drawn from."""
    r = (p - q).clamp_min(0)
    total = float(r.sum())
    return r / total if total > 1e-12 else p


def verify_drafts(session: ARSession, last: int, drafts: list[tuple[int, torch.Tensor]], accept: AcceptRule,
                  room: int) -> tuple[int, int | None, bool, torch.Tensor]:
    """One verification forward over ``last`` and the drafts (token, the distribution it was
    drawn from), shared by SJD and the draft-model loop: drafts are kept in order while
    ``accept`` says so; the first refused one is replaced from ``norm(max(0, p - q))``; if
    all are kept and ``room`` (tokens still wanted) allows, one more token comes from the
    last output. The cache keeps the fed token and the kept drafts. Returns (kept, the new
    token or None, whether a draft was refused, the forward's distributions)."""
    gen, before = session.gen, session.cached
    probs = session.forward([last] + [x for x, _ in drafts])  # probs[j]: draft position j
    kept, new = 0, None
    for j, (x, q) in enumerate(drafts):
        if accept(probs[j], q, x, gen):
            kept += 1
            continue
        new = draw(residual(probs[j], q), gen)
        break
    refused = new is not None
    if new is None and kept < room:
        new = draw(probs[kept], gen)  # every draft kept: one more token from the last output
    session.crop(before + 1 + kept)
    return kept, new, refused, probs


def sjd_loop(session: ARSession, progress: ProgressFn | None, window: int,
             accept: AcceptRule = speculative_accept, stats: LoopStats | None = None) -> torch.Tensor:
    """The SJD token loop (module doc). ``accept``: the acceptance rule (LANTERN relaxes it)."""
    gen, total, k = session.gen, session.n_tokens, session.codebook_size
    stats = stats if stats is not None else LoopStats()
    fresh_q = torch.full((k,), 1.0 / k)
    out = [draw(session.prefill(), gen)]
    drafts: list[tuple[int, torch.Tensor]] = []
    while len(out) < total:
        want = min(window, total - len(out))
        drafts = drafts[:want]
        while len(drafts) < want:  # fresh positions: uniform random tokens (SJD's initialisation)
            drafts.append((int(torch.randint(k, (), generator=gen)), fresh_q))
        kept, new, refused, probs = verify_drafts(session, out[-1], drafts, accept, total - len(out))
        stats.drafted += kept + refused  # the drafts verified
        stats.accepted += kept
        out += [x for x, _ in drafts[:kept]] + ([new] if new is not None else [])
        # Jacobi update: the positions after the new token, redrawn from this forward's outputs
        drafts = [(draw(probs[j], gen), probs[j]) for j in range(kept + 1, len(drafts) + 1)]
        if progress is not None:
            progress(min(len(out), total), total, "decode")
    stats.forwards, stats.tokens = session.forwards, len(out[:total])
    return torch.tensor([out[:total]])


class ARLoopHandle(RunHandle):
    """A run of an AR-image loop method: its ``LoopStats`` as the handle's stats."""

    def __init__(self, plan: ARImagePlan, stats: LoopStats):
        super().__init__(plan, stats=stats.as_dict)


def attach_loop(plan: ARImagePlan, make_loop: Callable[[LoopStats], Callable[..., torch.Tensor]]) -> ARLoopHandle:
    stats = LoopStats()
    handle = ARLoopHandle(plan, stats)
    handle.on_remove(set_ar_decoder(plan, make_loop(stats)))
    return handle


class SJDConfig(MethodConfig):
    window: int = param(16, min=1, max=64, help="L: draft tokens verified per forward (the Jacobi window); wider "
                                                "accepts more per forward but each forward is wider")


@register
class SJDMethod(Method):
    spec = MethodSpec(
        name="sjd",
        title="Speculative Jacobi decoding",
        modalities=("image",),
        families=(AR_FAMILY,),
        summary="Parallel Jacobi iterations over a window of future image tokens with probabilistic "
                "(speculative-sampling) acceptance: fewer forwards, same sampling distribution.",
        paper="Teng et al. 2024, Accelerating Auto-regressive Text-to-Image Generation with Training-free "
              "Speculative Jacobi Decoding (ICLR 2025)",
        lossless=True,
        config=SJDConfig,
        slots=(AR_SLOT,),
    )

    def attach(self, backend: Any, plan: ARImagePlan) -> ARLoopHandle:
        window = self.config.window
        return attach_loop(plan, lambda stats: lambda session, progress: sjd_loop(
            session, progress, window, stats=stats))
