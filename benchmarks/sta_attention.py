"""Attention-only micro-benchmark: sliding tile attention against dense SDPA.

``python -m benchmarks.sta_attention --grid 16x48x80 --tile 4x8x8 --window 3x3x3 --heads 2
--dim 64 --repeats 5 [--threads 2] [--backend flex] [--dtype float32] [--json FILE]``

Both run in the same process on the same q, k, v, interleaved (dense, sta, dense, sta,
...) after one warm-up call each (the warm-up of the flex path includes its
torch.compile). ``speedup = dense_seconds / sta_seconds`` (medians); ``ideal`` is
``1 / kept_fraction``, what a kernel with no overhead would get; ``efficiency`` is
speedup / ideal. Before timing, the STA output is checked against dense attention
restricted to the same token mask on a sample of query rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from kernels.sta import kept_fraction, sliding_tile_attention, tile_layout


def _triple(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected TxHxW, got {text!r}")
    return parts  # type: ignore[return-value]


def _spot_check(q, k, v, out, grid, tile, window, rows: int = 64) -> float:
    """Max abs error of ``out`` on ``rows`` random queries against masked dense attention."""
    pick = torch.randperm(q.shape[2], generator=torch.Generator().manual_seed(0))[:rows]
    lay = tile_layout(grid, tile, window)
    mt, mh, mw = (lay.axis_mask(axis) for axis in range(3))
    T, H, W = grid
    a, b, c = pick // (H * W), (pick // W) % H, pick % W
    mask = (mt[a][:, :, None, None] & mh[b][:, None, :, None] & mw[c][:, None, None, :]).reshape(len(pick), -1)
    scores = (q[:, :, pick].float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    ref = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.float()
    return (out[:, :, pick].float() - ref).abs().max().item()


def run(grid, tile, window, heads=2, dim=64, batch=1, repeats=5, backend="flex", dtype="float32") -> dict:
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    n = grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(batch, heads, n, dim, dtype=dt) for _ in range(3))

    def dense():
        return F.scaled_dot_product_attention(q, k, v)

    def sta():
        return sliding_tile_attention(q, k, v, grid, tile, window, backend=backend)

    t0 = time.perf_counter()
    out = sta()
    first_call = time.perf_counter() - t0
    error = _spot_check(q, k, v, out, grid, tile, window)
    dense()
    times: dict[str, list[float]] = {"dense": [], "sta": []}
    for _ in range(repeats):
        for name, fn in (("dense", dense), ("sta", sta)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    dense_s, sta_s = statistics.median(times["dense"]), statistics.median(times["sta"])
    kept = kept_fraction(grid, tile, window)
    lay = tile_layout(grid, tile, window)
    speedup = dense_s / sta_s
    return {
        "grid": list(grid), "tile": list(lay.tile), "window": list(lay.window), "tokens": n,
        "heads": heads, "dim": dim, "batch": batch, "dtype": dtype, "backend": backend,
        "threads": torch.get_num_threads(), "repeats": repeats,
        "kept_fraction": round(kept, 4), "dense_seconds": round(dense_s, 4), "sta_seconds": round(sta_s, 4),
        "speedup": round(speedup, 2), "ideal_speedup": round(1 / kept, 2),
        "efficiency": round(speedup * kept, 3), "first_call_seconds": round(first_call, 2),
        "max_abs_error_sampled": error,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sta_attention", description=__doc__.split("\n")[0])
    parser.add_argument("--grid", type=_triple, default=(16, 48, 80), help="tokens T x H x W")
    parser.add_argument("--tile", type=_triple, default=(4, 8, 8), help="tokens per tile tt x th x tw")
    parser.add_argument("--window", type=_triple, default=(3, 3, 3), help="tiles per window wt x wh x ww")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default="flex", choices=("flex", "sdpa", "torch", "triton", "auto"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--json", default=None, help="also write the result row to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    row = run(args.grid, args.tile, args.window, args.heads, args.dim, args.batch, args.repeats,
              args.backend, args.dtype)
    g, t, w = ("x".join(map(str, row[key])) for key in ("grid", "tile", "window"))
    print(f"grid {g} ({row['tokens']} tokens), tile {t}, window {w}, {row['heads']} heads x {row['dim']}, "
          f"batch {row['batch']}, {row['dtype']}, {row['threads']} threads, backend {row['backend']}")
    print(f"kept fraction   {row['kept_fraction']:.4f}  (ideal speedup {row['ideal_speedup']:.2f}x)")
    print(f"dense SDPA      {row['dense_seconds']:.4f} s  (median of {row['repeats']})")
    print(f"STA             {row['sta_seconds']:.4f} s  (first call incl. compile {row['first_call_seconds']:.1f} s)")
    print(f"speedup         {row['speedup']:.2f}x  (efficiency {row['efficiency']:.2f} of ideal)")
    print(f"max |error| on sampled rows vs masked dense: {row['max_abs_error_sampled']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
