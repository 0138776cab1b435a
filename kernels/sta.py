"""Sliding Tile Attention (Zhang et al. 2025, "Fast Video Generation with Sliding Tile
Attention"): each tile of query tokens attends only to the key tiles in a window of
tiles around it.

The video latent of a DiT is a grid of ``T x H x W`` tokens. Attention in trained video
DiTs is mostly local in space and time, so STA cuts the grid into tiles of
``tt x th x tw`` tokens and lets every query tile see the ``wt x wh x ww`` tiles centred
on it. At the borders the window is shifted to stay inside the grid (not cut off), so
every query sees the same number of key tiles. Working on whole tiles instead of a
per-token sliding window is what makes it fast: with tokens ordered tile-major, every
(query tile, key tile) pair is either entirely computed or entirely skipped, so a
block-sparse kernel whose block is one tile does no masked-out work at all (the paper's
point: sliding *window* attention leaves many half-empty blocks).

Grids that are not multiples of the tile are padded to whole tiles; padded keys are
masked, padded queries are dropped. The layout (tile counts, window starts, tile-major
permutation, block mask) is computed once per (grid, tile, window) and cached.

``sliding_tile_attention(q, k, v, grid, tile, window, backend=...)`` takes q, k, v as
``[batch, heads, T*H*W, dim]`` in raster order (t slowest, w fastest: what
``latent.flatten(2)`` gives) and returns the output in the same order. Backends:

- ``"torch"``: the explicit token-level mask and a float32 softmax. Quadratic memory,
  slow; it is the definition and the test oracle.
- ``"flex"``: ``torch.nn.attention.flex_attention`` with a tile-granular ``BlockMask``
  (BLOCK_SIZE = tile volume) over the tile-major sequence, compiled with
  ``torch.compile`` (falls back to eager flex when compilation is unavailable). The CPU
  path. The block mask is built from the tile-level window table with
  ``BlockMask.from_kv_blocks``, which is what ``create_block_mask`` computes, without
  evaluating the mask on all N^2 token pairs (3.8e9 at 16x48x80).
- ``"sdpa"``: grouped dense attention. Query tiles whose windows start at the same tile
  on every axis share the same keys (along an axis of n tiles with window w there are
  only n - w + 1 distinct windows), so each group gathers its window's keys once and
  makes one ``scaled_dot_product_attention`` call: PyTorch's fused CPU attention does
  exactly the kept pairs; the overhead is one gather of keys/values per group. No
  compilation.
- ``"triton"``: a kernel with one program per (query tile, batch*head) that loops over
  the key tiles of its window with an online softmax, so skipped tiles cost nothing,
  not even a mask lookup. GPU path; runs on CPU under ``TRITON_INTERPRET=1`` (slow,
  for correctness only).
- ``"auto"``: triton for CUDA tensors when triton imports, else flex, else torch.

Measured (``python -m benchmarks.sta_attention``, 2 threads, float32, 2 heads x 64, on a
2-core machine shared with trainings, so absolute seconds are inflated; ratios come
from interleaved runs):

- 16x48x80, tile 4x8x8, window 3x3x3 (11.25% kept): flex 5.49x-5.92x over dense SDPA
  in three runs (ideal 8.9x); grouped sdpa 3.28x.
- 8x24x40, tile 2x4x8, window 3x3x3 (22.5% kept): flex 1.37x-2.58x over four runs
  (ideal 4.4x); grouped sdpa 0.59x (its key gathers and small SDPA calls cost more than
  they save). Tiles of 2x8x8 with window 3x1x3 (15% kept): flex 2.83x. Blocks of 64
  tokens leave the CPU kernel with small GEMMs; larger tiles use it better.

``kept_fraction(grid, tile, window)`` is the fraction of (query, key) token pairs that
STA computes, against dense attention.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "torch", "flex", "sdpa", "triton")

Triple = tuple[int, int, int]


def _triple(value: int | Sequence[int], name: str) -> Triple:
    if isinstance(value, int):
        value = (value, value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 3 or any(v < 1 for v in value):
        raise ValueError(f"{name} must be three positive integers (t, h, w), got {value}")
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class TileLayout:
    """Everything about one (grid, tile, window) that does not depend on the data."""

    grid: Triple  # tokens per axis
    tile: Triple  # tokens per tile per axis (clamped to the grid)
    window: Triple  # tiles per window per axis (clamped to the number of tiles)

    @property
    def tiles(self) -> Triple:
        return tuple(-(-g // t) for g, t in zip(self.grid, self.tile))  # type: ignore[return-value]

    @property
    def padded(self) -> Triple:
        return tuple(n * t for n, t in zip(self.tiles, self.tile))  # type: ignore[return-value]

    @property
    def tile_volume(self) -> int:
        return math.prod(self.tile)

    @property
    def num_tiles(self) -> int:
        return math.prod(self.tiles)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def num_padded(self) -> int:
        return math.prod(self.padded)

    @property
    def has_padding(self) -> bool:
        return self.padded != self.grid

    def window_starts(self, axis: int) -> list[int]:
        """First key tile of the window of each query tile along ``axis``: centred, then
        shifted back inside the grid."""
        n, w = self.tiles[axis], self.window[axis]
        return [min(max(i - w // 2, 0), n - w) for i in range(n)]

    def axis_mask(self, axis: int) -> torch.Tensor:
        """[grid, grid] bool: token i sees token j along ``axis``."""
        tile_of = torch.arange(self.grid[axis]) // self.tile[axis]
        start = torch.tensor(self.window_starts(axis))[tile_of]
        return (tile_of[None, :] >= start[:, None]) & (tile_of[None, :] < start[:, None] + self.window[axis])

    def tile_windows(self) -> torch.Tensor:
        """[num_tiles, wt*wh*ww] long: the key tiles of each query tile (tile-major ids)."""
        nt, nh, nw = self.tiles
        wt, wh, ww = self.window
        st, sh, sw = (torch.tensor(self.window_starts(a)) for a in range(3))
        ti, hi, wi = torch.meshgrid(torch.arange(nt), torch.arange(nh), torch.arange(nw), indexing="ij")
        kt = st[ti.reshape(-1)][:, None] + torch.arange(wt)[None, :]
        kh = sh[hi.reshape(-1)][:, None] + torch.arange(wh)[None, :]
        kw = sw[wi.reshape(-1)][:, None] + torch.arange(ww)[None, :]
        ids = (kt[:, :, None, None] * nh + kh[:, None, :, None]) * nw + kw[:, None, None, :]
        return ids.reshape(self.num_tiles, -1)

    def tile_is_padded(self) -> torch.Tensor:
        """[num_tiles] bool: the tile holds padding tokens (a partial block)."""
        flags = []
        for axis in range(3):
            n, t, g = self.tiles[axis], self.tile[axis], self.grid[axis]
            flags.append(torch.arange(n) * t + t > g)
        ft, fh, fw = flags
        return (ft[:, None, None] | fh[None, :, None] | fw[None, None, :]).reshape(-1)

    def to_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, T*H*W, D] raster order -> [B, H, padded tokens, D] tile-major order."""
        b, h, _, d = x.shape
        (T, H, W), (tt, th, tw), (nt, nh, nw) = self.grid, self.tile, self.tiles
        x = x.reshape(b, h, T, H, W, d)
        if self.has_padding:
            pt, ph, pw = (p - g for p, g in zip(self.padded, self.grid))
            x = F.pad(x, (0, 0, 0, pw, 0, ph, 0, pt))
        x = x.reshape(b, h, nt, tt, nh, th, nw, tw, d).permute(0, 1, 2, 4, 6, 3, 5, 7, 8)
        return x.reshape(b, h, self.num_padded, d)

    def from_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of ``to_tiles`` (padding dropped)."""
        b, h, _, d = x.shape
        (T, H, W), (tt, th, tw), (nt, nh, nw) = self.grid, self.tile, self.tiles
        x = x.reshape(b, h, nt, nh, nw, tt, th, tw, d).permute(0, 1, 2, 5, 3, 6, 4, 7, 8)
        x = x.reshape(b, h, nt * tt, nh * th, nw * tw, d)
        if self.has_padding:
            x = x[:, :, :T, :H, :W]
        return x.reshape(b, h, self.num_tokens, d)

    def valid_tokens(self) -> torch.Tensor:
        """[padded tokens] bool in tile-major order: a real token, not padding."""
        ones = torch.ones(1, 1, self.num_tokens, 1, dtype=torch.bool)
        return self.to_tiles(ones).reshape(-1)


@functools.lru_cache(maxsize=64)
def tile_layout(grid: Sequence[int], tile: Sequence[int], window: Sequence[int]) -> TileLayout:
    grid, tile, window = _triple(grid, "grid"), _triple(tile, "tile"), _triple(window, "window")
    tile = tuple(min(t, g) for t, g in zip(tile, grid))
    tiles = tuple(-(-g // t) for g, t in zip(grid, tile))
    window = tuple(min(w, n) for w, n in zip(window, tiles))
    return TileLayout(grid, tile, window)  # type: ignore[arg-type]


def kept_fraction(grid: Sequence[int], tile: Sequence[int], window: Sequence[int]) -> float:
    """Fraction of the (query, key) token pairs of dense attention that STA computes.

    The mask is a product of one mask per axis, so the fraction is the product of the
    per-axis fractions. With whole tiles it is prod(window / tiles) per axis, e.g.
    grid 8x24x40, tile 2x4x8, window 3x3x3: (3/4)(3/6)(3/5) = 0.225.
    """
    lay = tile_layout(tuple(_triple(grid, "grid")), tuple(_triple(tile, "tile")), tuple(_triple(window, "window")))
    fraction = 1.0
    for axis in range(3):
        fraction *= lay.axis_mask(axis).sum().item() / lay.grid[axis] ** 2
    return fraction


def token_mask(grid: Sequence[int], tile: Sequence[int], window: Sequence[int]) -> torch.Tensor:
    """[N, N] bool over raster-ordered tokens: query i attends to key j."""
    lay = tile_layout(tuple(_triple(grid, "grid")), tuple(_triple(tile, "tile")), tuple(_triple(window, "window")))
    mt, mh, mw = (lay.axis_mask(a) for a in range(3))
    mask = mt[:, None, None, :, None, None] & mh[None, :, None, None, :, None] & mw[None, None, :, None, None, :]
    return mask.reshape(lay.num_tokens, lay.num_tokens)


# ---------------------------------------------------------------------------- torch


def sta_torch(q, k, v, lay: TileLayout, scale: float) -> torch.Tensor:
    """The reference: dense scores, the explicit token mask, float32 softmax."""
    mask = token_mask(lay.grid, lay.tile, lay.window).to(q.device)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)


# ----------------------------------------------------------------------------- flex


@functools.lru_cache(maxsize=32)
def _block_mask(lay: TileLayout, device: str):
    """Tile-granular BlockMask over the tile-major padded sequence (cached)."""
    from torch.nn.attention.flex_attention import BlockMask

    windows = lay.tile_windows()  # [num_tiles, K]
    padded = lay.tile_is_padded()[windows]  # key tiles with padding: partial blocks
    count = windows.shape[1]
    # Sort so that each row lists its full tiles first, then its partial ones.
    order = torch.argsort(padded.to(torch.int8), dim=1, stable=True)
    windows = torch.gather(windows, 1, order)
    padded = torch.gather(padded, 1, order)
    full_num = (~padded).sum(1).to(torch.int32)
    partial_num = padded.sum(1).to(torch.int32)
    # Partial indices: shift each row's partial tiles to the front.
    shift = torch.arange(count)[None, :] + full_num[:, None].long()
    partial = torch.gather(windows, 1, shift.clamp(max=count - 1))
    # BlockMask wants index tables as wide as the number of key blocks.
    width = lay.num_tiles
    full_idx = F.pad(windows, (0, width - count)).to(torch.int32)
    partial_idx = F.pad(partial, (0, width - count)).to(torch.int32)
    # The mask_mod states the whole rule, so that eager flex (which ignores block
    # sparsity) is right too; compiled flex only evaluates it in the partial blocks.
    allowed = torch.zeros(lay.num_tiles, lay.num_tiles, dtype=torch.bool)
    allowed.scatter_(1, lay.tile_windows(), True)
    allowed, valid, volume = allowed.to(device), lay.valid_tokens().to(device), lay.tile_volume

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[q_idx // volume, kv_idx // volume] & valid[kv_idx]

    return BlockMask.from_kv_blocks(
        partial_num[None, None].to(device), partial_idx[None, None].to(device),
        full_num[None, None].to(device), full_idx[None, None].to(device),
        BLOCK_SIZE=lay.tile_volume, mask_mod=mask_mod, seq_lengths=(lay.num_padded, lay.num_padded),
    )


_FLEX_STATE: dict[str, object] = {}


def _flex_attention():
    """The compiled flex_attention, or eager flex when compiling does not work here."""
    from torch.nn.attention.flex_attention import flex_attention

    if "fn" not in _FLEX_STATE:
        compiled = os.environ.get("FASTGEN_STA_COMPILE", "1") != "0"
        _FLEX_STATE["fn"] = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
        _FLEX_STATE["compiled"] = compiled
    return _FLEX_STATE["fn"], flex_attention


def set_flex_compile(enabled: bool) -> None:
    """Use the compiled (default) or the eager flex_attention from now on. Eager flex is
    exact too but materializes all scores: for tests on small grids, where each new
    shape would cost a compile of 20-100 s on a busy 2-core machine."""
    from torch.nn.attention.flex_attention import flex_attention

    _FLEX_STATE["fn"] = torch.compile(flex_attention, dynamic=False) if enabled else flex_attention
    _FLEX_STATE["compiled"] = enabled


def flex_is_compiled() -> bool:
    _flex_attention()
    return bool(_FLEX_STATE["compiled"])


def sta_flex(q, k, v, lay: TileLayout, scale: float) -> torch.Tensor:
    qt, kt, vt = (lay.to_tiles(x).contiguous() for x in (q, k, v))
    block_mask = _block_mask(lay, str(q.device))
    fn, eager = _flex_attention()
    try:
        out = fn(qt, kt, vt, block_mask=block_mask, scale=scale)
    except Exception:  # noqa: BLE001 - no compiler, unsupported shape: the eager kernel is exact too
        if fn is eager:
            raise
        _FLEX_STATE["fn"], _FLEX_STATE["compiled"] = eager, False
        out = eager(qt, kt, vt, block_mask=block_mask, scale=scale)
    return lay.from_tiles(out)


# ------------------------------------------------------------------- grouped SDPA


@functools.lru_cache(maxsize=32)
def _window_groups(lay: TileLayout, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Query tiles whose windows start at the same tile on every axis share their keys:
    one (query token ids, key token ids) pair per distinct window, raster ids."""
    per_axis = []
    for axis in range(3):
        starts = lay.window_starts(axis)
        tile, window, size = lay.tile[axis], lay.window[axis], lay.grid[axis]
        coords = torch.arange(size)
        tile_of = coords // tile
        groups = []
        for start in sorted(set(starts)):
            members = torch.tensor([i for i, s in enumerate(starts) if s == start])
            queries = coords[torch.isin(tile_of, members)]
            keys = coords[(tile_of >= start) & (tile_of < start + window)]
            groups.append((queries, keys))
        per_axis.append(groups)
    (T, H, W) = lay.grid

    def raster(t, h, w):
        return ((t[:, None, None] * H + h[None, :, None]) * W + w[None, None, :]).reshape(-1).to(device)

    return [(raster(qt, qh, qw), raster(kt, kh, kw))
            for qt, kt in per_axis[0] for qh, kh in per_axis[1] for qw, kw in per_axis[2]]


def sta_grouped_sdpa(q, k, v, lay: TileLayout, scale: float) -> torch.Tensor:
    """One dense SDPA call per distinct window: all query tiles sharing a window attend
    to its gathered keys. Same mask as STA, computed by PyTorch's fused CPU attention;
    the price is gathering each window's keys once per group (not once per tile)."""
    out = torch.empty_like(q)
    for queries, keys in _window_groups(lay, str(q.device)):
        kg, vg = k.index_select(2, keys), v.index_select(2, keys)
        out.index_copy_(2, queries, F.scaled_dot_product_attention(q.index_select(2, queries), kg, vg, scale=scale))
    return out


# --------------------------------------------------------------------------- triton


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or a broken install
        return False
    return True


@functools.lru_cache(maxsize=1)
def _triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def sta_forward(Q, K, V, O, VALID, WIN, sm_scale, n_padded,
                    TILE: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, NUM_WIN: tl.constexpr, DOT_F32: tl.constexpr):
        tile_id = tl.program_id(0)
        bh = tl.program_id(1)
        base = bh.to(tl.int64) * n_padded * HEAD_DIM
        rows = tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        row_ok = rows < TILE
        col_ok = cols < HEAD_DIM
        q_off = (tile_id * TILE + rows)[:, None] * HEAD_DIM + cols[None, :]
        q = tl.load(Q + base + q_off, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for j in range(NUM_WIN):  # the key tiles of this query tile's window, nothing else
            key_tile = tl.load(WIN + tile_id * NUM_WIN + j)
            key_rows = key_tile * TILE + rows
            valid = tl.load(VALID + key_rows, mask=row_ok, other=0) != 0
            kv_off = key_rows[:, None] * HEAD_DIM + cols[None, :]
            kv_mask = valid[:, None] & col_ok[None, :]
            k = tl.load(K + base + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(V + base + kv_off, mask=kv_mask, other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * sm_scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(O + base + q_off, out.to(O.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    return sta_forward


def _interpreted() -> bool:
    # triton 3.9's interpreter computes tl.dot on bfloat16 inputs wrongly (1e10 errors),
    # so under TRITON_INTERPRET the operands go up to float32 first; on a GPU the dots
    # stay in the input dtype.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=32)
def _triton_tables(lay: TileLayout, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return (lay.valid_tokens().to(torch.int8).to(device),
            lay.tile_windows().to(torch.int32).contiguous().to(device))


def sta_triton(q, k, v, lay: TileLayout, scale: float) -> torch.Tensor:
    import triton

    b, h, _, d = q.shape
    qt, kt, vt = (lay.to_tiles(x).contiguous() for x in (q, k, v))
    out = torch.empty_like(qt)
    valid, windows = _triton_tables(lay, str(q.device))
    _triton_kernel()[(lay.num_tiles, b * h)](
        qt, kt, vt, out, valid, windows, float(scale), lay.num_padded,
        TILE=lay.tile_volume, BLOCK_M=max(16, triton.next_power_of_2(lay.tile_volume)),
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), NUM_WIN=windows.shape[1],
        DOT_F32=_interpreted(),
    )
    return lay.from_tiles(out)


# --------------------------------------------------------------------------- public


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type == "cuda" and triton_available():
        return "triton"
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:  # pragma: no cover - torch < 2.5
        return "torch"
    return "flex"


def sliding_tile_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Sequence[int],
                           tile: Sequence[int], window: Sequence[int], backend: str = "auto",
                           scale: float | None = None) -> torch.Tensor:
    """Attention of ``q`` over ``k, v`` restricted to sliding tile windows.

    Args:
        q, k, v: ``[batch, heads, T*H*W, dim]``, tokens in raster order over ``grid``.
        grid: ``(T, H, W)`` tokens per axis.
        tile: ``(tt, th, tw)`` tokens per tile; larger tiles make bigger, more efficient
            blocks but a coarser window.
        window: ``(wt, wh, ww)`` key tiles per query tile (odd numbers centre the window);
            a window as large as the tile grid is dense attention.
        backend: ``"auto"``, ``"torch"`` (reference), ``"flex"`` (CPU), ``"triton"`` (GPU).
        scale: softmax scale, default ``dim ** -0.5``.

    Returns:
        ``[batch, heads, T*H*W, dim]`` in raster order, dtype of ``q``.

    Example::

        >>> q = k = v = torch.randn(1, 2, 4 * 8 * 8, 16)
        >>> out = sliding_tile_attention(q, k, v, grid=(4, 8, 8), tile=(2, 4, 4), window=(1, 1, 1),
        ...                              backend="torch")
        >>> kept_fraction((4, 8, 8), (2, 4, 4), (1, 1, 1))
        0.125
    """
    lay = tile_layout(tuple(_triple(grid, "grid")), tuple(_triple(tile, "tile")), tuple(_triple(window, "window")))
    if q.ndim != 4 or q.shape[2] != lay.num_tokens or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be [batch, heads, {lay.num_tokens}, dim] for grid {lay.grid}; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    name = resolve_backend(backend, q.device)
    if name == "torch":
        return sta_torch(q, k, v, lay, scale)
    if name == "flex":
        return sta_flex(q, k, v, lay, scale)
    if name == "sdpa":
        return sta_grouped_sdpa(q, k, v, lay, scale)
    return sta_triton(q, k, v, lay, scale)
