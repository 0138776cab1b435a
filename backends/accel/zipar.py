"""ZipAR (He et al. 2024, "ZipAR: Accelerating Auto-regressive Image Generation through Spatial
Locality"): rows of the token grid are decoded in parallel once the row above is far enough
ahead, since an image token depends mostly on its spatial neighbours, not on the far end of
the row above.

Row ``r`` may write column ``c`` once row ``r-1`` holds ``c + window`` tokens (or is done),
so after a start-up of ``window`` tokens per row, every step writes one token in each open
row: about ``(rows - 1) * window + columns`` forwards instead of ``rows * columns`` (8x8
grid, window 4: 36 forwards for 64 tokens). Lossy: a token no longer sees the right end of
the row above, which the model saw in training; ``window = columns`` is plain raster order.

One forward per step, over the tokens written in the previous step (each at its raster
position, so RoPE places it where the model expects it) with a 4-D mask in raster order:
a token sees the prompt and every written token before it in raster order. The first token
of row ``r`` is predicted at raster position ``(r-1, last column)``, which is not written
yet: a stand-in query sits there (the latest token of row ``r-1``, its nearest written
neighbour), is seen by no other token and is dropped from the cache after the forward.
"""

from __future__ import annotations

from typing import Any

import torch

from backends.accel._ar_decoding import AR_FAMILY, AR_SLOT, ARSession, LoopStats, ProgressFn, draw, loaded_layout
from backends.accel.base import Limits, Method, MethodConfig, MethodSpec, param, register
from backends.accel.sjd import ARLoopHandle, attach_loop
from backends.plan import ARImagePlan

PROMPT = -1  # the raster position recorded for the prompt's cache entries: seen by every token


def _raster_mask(keys: list[int], key_real: list[bool], queries: list[int], query_real: list[bool]) -> torch.Tensor:
    """(queries, keys) booleans: the prompt, plus written tokens at or before the query in
    raster order; a stand-in query also sees itself and no other stand-in (module doc)."""
    key_pos = torch.tensor(keys)
    real = torch.tensor(key_real)
    mask = (key_pos[None, :] <= torch.tensor(queries)[:, None]) & real[None, :]
    mask |= (key_pos == PROMPT)[None, :]
    n_cached = len(keys) - len(queries)
    for i, is_real in enumerate(query_real):
        if not is_real:
            mask[i, n_cached + i] = True
    return mask


def zipar_loop(session: ARSession, progress: ProgressFn | None, window: int, stats: LoopStats) -> torch.Tensor:
    gen, g = session.gen, session.layout.grid
    total = g * g
    grid: list[list[int]] = [[] for _ in range(g)]  # tokens written per row
    cache_pos = [PROMPT] * session.prefix.shape[1]
    first = draw(session.prefill(), gen)
    grid[0].append(first)
    pending = [0]  # raster positions written last step: the next forward's inputs
    while sum(len(row) for row in grid) < total:
        # rows that write a token this step, and where their query sits in raster order
        movers = [r for r in range(g) if len(grid[r]) < g and (r == 0 or len(grid[r - 1]) >= min(g, len(grid[r]) + window))]
        queries = {r: r * g + len(grid[r]) - 1 for r in movers}  # the raster position before the next token
        inputs, real = list(pending), [True] * len(pending)
        standins = [(r, q) for r, q in queries.items() if q not in pending]
        for r, q in standins:
            inputs.append(q)
            real.append(False)
        tokens = [_token_at(grid, p, g) if is_real else _standin(grid, p, g) for p, is_real in zip(inputs, real)]
        keys = cache_pos + inputs
        key_real = [True] * len(cache_pos) + real
        mask = _raster_mask(keys, key_real, inputs, real)
        probs = session.forward(tokens, positions=inputs, mask=mask)
        cache_pos += list(pending)
        session.crop(len(cache_pos))  # the stand-ins (fed last) leave the cache
        at = {(p, is_real): i for i, (p, is_real) in enumerate(zip(inputs, real))}
        pending = []
        for r in movers:
            q = queries[r]
            i = at.get((q, True), at.get((q, False)))
            grid[r].append(draw(probs[i], gen))
            pending.append(r * g + len(grid[r]) - 1)
        if progress is not None:
            progress(sum(len(row) for row in grid), total, "decode")
    stats.forwards, stats.tokens = session.forwards, total
    return torch.tensor([[t for row in grid for t in row]])


def _token_at(grid: list[list[int]], pos: int, g: int) -> int:
    return grid[pos // g][pos % g]


def _standin(grid: list[list[int]], pos: int, g: int) -> int:
    """The token a stand-in query carries: the real one if written, else the latest of its row."""
    row, col = divmod(pos, g)
    return grid[row][col] if col < len(grid[row]) else grid[row][-1]


class ZipARConfig(MethodConfig):
    window: int = param(4, min=1, max=64, help="tokens a row must lead the row below by (smaller = more rows in "
                                               "parallel, fewer forwards, further from raster order; the grid "
                                               "width = plain decoding)")


@register
class ZipARMethod(Method):
    spec = MethodSpec(
        name="zipar",
        title="ZipAR (parallel rows)",
        modalities=("image",),
        families=(AR_FAMILY,),
        summary="Decodes rows of the token grid in parallel once the row above leads by a window: "
                "fewer forwards, lossy (a token does not see the far end of the row above).",
        paper="He et al. 2024, ZipAR: Accelerating Auto-regressive Image Generation through Spatial Locality "
              "(ICML 2025)",
        lossless=False,
        config=ZipARConfig,
        slots=(AR_SLOT,),
    )

    @classmethod
    def limits(cls, backend: Any) -> Limits:
        """``window``: at most the grid's width (8 for the bundled model, 24 for Janus-Pro's
        384 px), which is already plain raster order; a wider one would only be the same run."""
        layout = loaded_layout(backend)
        return Limits(ranges={"window": (None, layout.grid)}) if layout is not None else Limits()

    def attach(self, backend: Any, plan: ARImagePlan) -> ARLoopHandle:
        window = self.config.window
        return attach_loop(plan, lambda stats: lambda session, progress: zipar_loop(session, progress, window, stats))
