"""Attention-only micro-benchmark: Sparse-vDiT's per-head block-sparse attention against dense SDPA.

``python -m benchmarks.sparse_vdit_attention --grid 8x24x40 --block 64
--patterns "diagonal:8,multi_diagonal:1,vertical_stripe:16,dense" --dim 64 --repeats 5 --threads 1
[--share-of tiny-video-shapes] [--json FILE]``

One head per entry of ``--patterns`` (``kind:width``; for ``vertical_stripe`` the width
is the number of stripe blocks, spread evenly). The default mix keeps about 37% of the key
blocks, near the FLOP reduction the paper reports (2.09x on CogVideoX1.5). Dense SDPA and
the compiled flex_attention path run on the same q, k, v, interleaved, through the
measurement engine (``studio.measure``: a warm-up each, which for flex includes the
compile; speedup = median of paired ratios). ``ideal`` is ``1 / kept``. Before timing,
the flex output is checked against the masked reference on a sample of query rows.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from kernels.sparse_heads import HeadPattern, SparseHeadAttention, head_masks

DEFAULT_PATTERNS = "diagonal:8,multi_diagonal:1,vertical_stripe:16,dense"


def _triple(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected TxHxW, got {text!r}")
    return parts  # type: ignore[return-value]


def parse_patterns(text: str, blocks: int) -> list[HeadPattern]:
    patterns = []
    for item in text.split(","):
        kind, _, width = item.strip().partition(":")
        width_n = int(width or 0)
        if kind == "vertical_stripe":
            stripes = tuple(sorted({round(i * blocks / max(1, width_n)) % blocks for i in range(width_n)}))
            patterns.append(HeadPattern(kind, 0, stripes))
        else:
            patterns.append(HeadPattern(kind, width_n))
    return patterns


def _spot_check(q, k, v, out, masks, block: int, rows: int = 64) -> float:
    """Max abs error of ``out`` on ``rows`` random queries against masked dense attention."""
    pick = torch.randperm(q.shape[2], generator=torch.Generator().manual_seed(0))[:rows]
    token_mask = masks[:, pick // block].repeat_interleave(block, dim=2)  # [heads, rows, N]
    scores = (q[:, :, pick] @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    ref = scores.masked_fill(~token_mask[None], float("-inf")).softmax(-1) @ v
    return (out[:, :, pick] - ref).abs().max().item()


def run(grid, block: int, patterns_text: str, dim: int = 64, batch: int = 1, repeats: int = 5) -> dict:
    from studio.measure import Timed, measure, summarize

    n = math.prod(grid)
    if n % block:
        raise SystemExit(f"{n} tokens are not a multiple of block {block}")
    blocks, frame_blocks = n // block, grid[1] * grid[2] / block
    patterns = parse_patterns(patterns_text, blocks)
    masks = head_masks(patterns, blocks, frame_blocks)
    heads = len(patterns)
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, dim) for _ in range(3))
    sparse = SparseHeadAttention(masks, block, backend="flex")
    calls = [lambda: F.scaled_dot_product_attention(q, k, v), lambda: sparse(q, k, v)]
    first = {}

    def timed(config: int, _case: int) -> Timed:
        start = time.perf_counter()
        calls[config]()
        return Timed(time.perf_counter() - start)

    def warm(config: int, _case: int) -> None:
        start = time.perf_counter()
        out = calls[config]()
        first[config] = time.perf_counter() - start
        if config == 1:
            first["error"] = _spot_check(q, k, v, out, masks, block)

    from kernels.sta import flex_is_compiled

    measurement = measure(2, 1, timed, repeats=repeats, warm=warm, labels=["dense", "sparse"])
    dense, sparse = summarize(measurement)
    kept = float(masks.float().mean())
    return {
        "grid": list(grid), "tokens": n, "block": block, "heads": heads, "dim": dim, "batch": batch,
        "patterns": [p.to_dict() for p in patterns],
        "kept_per_head": [round(float(m.float().mean()), 4) for m in masks],
        "kept_fraction": round(kept, 4), "ideal_speedup": round(1 / kept, 2),
        "flex_compiled": flex_is_compiled(), "threads": torch.get_num_threads(), "repeats": repeats,
        "dense_seconds": round(dense.seconds, 4), "sparse_seconds": round(sparse.seconds, 4),
        "speedup": round(sparse.speedup.median, 3),
        "speedup_range": [round(sparse.speedup.low, 3), round(sparse.speedup.high, 3)],
        "efficiency": round(sparse.speedup.median * kept, 3),
        "first_call_seconds": round(first.get(1, 0.0), 2),
        "max_abs_error_sampled": first.get("error"),
    }


def attention_share(model: str, steps: int = 25, seed: int = 0) -> dict:
    """On a real model: the share of one run's denoiser time spent in self-attention (the
    most Sparse-vDiT can remove), its token count, and the dense attention's seconds."""
    from backends.accel.sta import self_attention_modules
    from backends.manager import BackendManager
    from backends.types import Request

    backend = BackendManager(device="cpu", dtype=torch.float32).get("video", model)
    modules = self_attention_modules(backend.denoiser)
    seconds = {"attention": 0.0, "denoiser": 0.0}
    tokens = []

    def timed(key, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[key] += time.perf_counter() - start
        return call

    originals = [m.processor for m in modules]
    for module, original in zip(modules, originals):
        def processor(attn, hidden_states, *args, _original=original, **kwargs):
            tokens.append(hidden_states.shape[1])
            return timed("attention", _original)(attn, hidden_states, *args, **kwargs)
        module.processor = processor
    forward = backend.denoiser.forward
    backend.denoiser.forward = timed("denoiser", forward)
    try:
        backend.run(Request("video", model, "a red circle moving right on white", seed=seed, params={"steps": steps}))
    finally:
        del backend.denoiser.forward
        for module, original in zip(modules, originals):
            module.processor = original
    return {"model": model, "tokens": tokens[0] if tokens else None, "steps": steps,
            "self_attention_seconds": round(seconds["attention"], 3),
            "denoiser_seconds": round(seconds["denoiser"], 3),
            "self_attention_share": round(seconds["attention"] / seconds["denoiser"], 3) if seconds["denoiser"] else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sparse_vdit_attention",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--grid", type=_triple, default=(8, 24, 40), help="tokens T x H x W")
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--patterns", default=DEFAULT_PATTERNS, help="one kind:width per head")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--json", default=None, help="also write the result row to this file")
    parser.add_argument("--share-of", default=None, metavar="MODEL",
                        help="also measure the self-attention share of a run of this video model")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    row = run(args.grid, args.block, args.patterns, args.dim, args.batch, args.repeats)
    if args.share_of:
        row["model_attention"] = attention_share(args.share_of)
        print(f"{args.share_of}: self-attention is {row['model_attention']['self_attention_share']:.1%} of the "
              f"denoiser time at {row['model_attention']['tokens']} tokens")
    print(f"grid {'x'.join(map(str, row['grid']))} ({row['tokens']} tokens), block {row['block']}, "
          f"{row['heads']} heads x {row['dim']}, {row['threads']} threads, flex compiled: {row['flex_compiled']}")
    print(f"kept per head   {row['kept_per_head']}  (mean {row['kept_fraction']:.4f}, ideal {row['ideal_speedup']}x)")
    print(f"dense SDPA      {row['dense_seconds']:.4f} s   sparse flex {row['sparse_seconds']:.4f} s "
          f"(first call incl. compile {row['first_call_seconds']:.1f} s)")
    print(f"speedup         {row['speedup']:.2f}x (paired range {row['speedup_range']}, efficiency "
          f"{row['efficiency']:.2f} of ideal)")
    print(f"max |error| on sampled rows vs masked dense: {row['max_abs_error_sampled']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
