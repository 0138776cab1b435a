"""Attention-only micro-benchmark: int8 attention (SageAttention's recipe) against SDPA.

``python -m benchmarks.int8_attention --tokens 4096 --heads 2 --dim 64 --repeats 5 --threads 1
[--real tiny-video-shapes] [--json FILE]``

Timing: the same q, k, v, one warm-up call each, then interleaved repeats (sdpa, int8,
int8 GEMM, fp32 GEMM, sdpa, ...); every speed figure is the median of the per-repeat
paired ratios ``sdpa_seconds / other_seconds``. Parts timed on their own:

- ``int8_sdpa``: ``kernels.int8_attention`` with backend ``sdpa`` (the method's CPU path:
  Q and smoothed K quantized per block, dequantized into PyTorch's fused SDPA).
- ``int8_reference``: backend ``torch`` (the exact-integer oracle: scores as a float32
  matmul of the int8 values, unfused float32 softmax and P·V).
- ``quantize``: the per-block quantization of Q and K alone.
- ``int8_gemm`` against ``fp32_gemm``: one head's Q·Kᵀ with ``torch._int_mm`` (int8 in,
  int32 out, oneDNN's VNNI kernel on CPU) against the float32 matmul of the same values:
  what int8 arithmetic itself buys on this CPU, the upper bound of a CPU int8 kernel.

Accuracy, against float64 exact attention: max and mean absolute error and the cosine
similarity of the outputs (SageAttention reports cosine similarity), with and without K
smoothing, on random q, k, v whose keys carry a shared channel offset (as trained keys
do), and with ``--real`` on the q, k, v captured from the first self-attention call of a
bundled model (``tiny-video-shapes`` or ``tiny-flux-shapes``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from kernels.int8_attention import int8_attention, quantize_qk


def accuracy(q, k, v, block_q: int, block_k: int) -> dict:
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    row = {}
    for smooth in (True, False):
        out = int8_attention(q, k, v, block_q, block_k, smooth=smooth, backend="sdpa").double()
        error = (out - exact).abs()
        cosine = F.cosine_similarity(out.flatten(), exact.flatten(), dim=0).item()
        tag = "smooth_k" if smooth else "no_smoothing"
        row[tag] = {"max_abs_error": round(error.max().item(), 6), "mean_abs_error": round(error.mean().item(), 7),
                    "cosine_similarity": round(cosine, 7)}
    return row


def random_qkv(tokens: int, heads: int, dim: int, key_offset: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, tokens, dim, generator=g)
    k = torch.randn(1, heads, tokens, dim, generator=g) + key_offset * torch.randn(dim, generator=g)
    v = torch.randn(1, heads, tokens, dim, generator=g)
    return q, k, v


def captured_qkv(model: str):
    """q, k, v ``[batch, heads, tokens, dim]`` of the first attention call of a bundled model's
    denoiser (captured through the int8_attention method's processor)."""
    from backends.accel import int8_attention as method
    from backends.manager import BackendManager
    from backends.types import MethodChoice, Request

    modality = "video" if "video" in model else "image"
    backend = BackendManager(device="cpu", dtype=torch.float32).get(modality, model)
    seen = []
    original = method.Int8AttnProcessor._int8

    def capture(self, q, k, v, scale):
        if not seen:
            seen.append((q.clone(), k.clone(), v.clone()))
        return original(self, q, k, v, scale)

    method.Int8AttnProcessor._int8 = capture
    try:
        backend.run(Request(modality, model, "a red circle moving right on white", seed=1,
                            params={"steps": 1, "guidance": 1.0},
                            methods=[MethodChoice("int8_attention", {})]))
    finally:
        method.Int8AttnProcessor._int8 = original
    return seen[0]


def timing(q, k, v, block_q: int, block_k: int, repeats: int) -> dict:
    qi, _, ki, _ = quantize_qk(q, k, block_q, block_k, True, q.shape[-1] ** -0.5)
    a, b = qi[0, 0].contiguous(), ki[0, 0].transpose(0, 1).contiguous()
    af, bf = a.float(), b.float()
    calls = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "int8_sdpa": lambda: int8_attention(q, k, v, block_q, block_k, backend="sdpa"),
        "int8_reference": lambda: int8_attention(q, k, v, block_q, block_k, backend="torch"),
        "quantize": lambda: quantize_qk(q, k, block_q, block_k, True, q.shape[-1] ** -0.5),
        "int8_gemm": lambda: torch._int_mm(a, b),
        "fp32_gemm": lambda: torch.matmul(af, bf),
    }
    assert torch.equal(torch._int_mm(a, b), torch.matmul(af, bf).to(torch.int32))  # the same integers
    for fn in calls.values():
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)

    def paired(num: str, den: str) -> float:
        return round(statistics.median(n / d for n, d in zip(seconds[num], seconds[den])), 3)

    return {
        "median_seconds": {name: round(statistics.median(s), 5) for name, s in seconds.items()},
        "int8_sdpa_speedup_over_sdpa": paired("sdpa", "int8_sdpa"),
        "int8_reference_speedup_over_sdpa": paired("sdpa", "int8_reference"),
        "quantize_share_of_int8_sdpa": round(statistics.median(
            qt / it for qt, it in zip(seconds["quantize"], seconds["int8_sdpa"])), 3),
        "int8_gemm_speedup_over_fp32_gemm": paired("fp32_gemm", "int8_gemm"),
    }


def run(tokens: int, heads: int, dim: int, repeats: int, block_q: int, block_k: int, key_offset: float,
        real: str | None) -> dict:
    q, k, v = random_qkv(tokens, heads, dim, key_offset)
    row = {
        "what": "int8 attention (CPU paths) vs PyTorch SDPA, float32",
        "tokens": tokens, "heads": heads, "dim": dim, "block_q": block_q, "block_k": block_k,
        "threads": torch.get_num_threads(), "repeats": repeats, "key_offset": key_offset,
        "timing": timing(q, k, v, block_q, block_k, repeats),
        "accuracy_random": accuracy(q, k, v, block_q, block_k),
    }
    if real:
        rq, rk, rv = captured_qkv(real)
        row["accuracy_real"] = {"model": real, "shape": list(rq.shape), "keys": rk.shape[2],
                                **accuracy(rq, rk, rv, block_q, block_k)}
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8_attention", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block-q", type=int, default=128)
    parser.add_argument("--block-k", type=int, default=64)
    parser.add_argument("--key-offset", type=float, default=3.0, help="scale of the shared key channel offset")
    parser.add_argument("--real", default=None, help="also measure accuracy on q, k, v captured from this "
                                                     "bundled model (tiny-video-shapes, tiny-flux-shapes)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    row = run(args.tokens, args.heads, args.dim, args.repeats, args.block_q, args.block_k, args.key_offset,
              args.real)
    print(json.dumps(row, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
