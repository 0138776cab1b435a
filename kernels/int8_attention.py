"""INT8 attention (SageAttention, Zhang et al. 2025, "SageAttention: Accurate 8-Bit Attention
for Plug-and-play Inference Acceleration"): Q and K quantized to int8 per block, the scores
from an int8 Q·Kᵀ rescaled by the two blocks' scales, softmax and P·V in higher precision.

Why it works, and the three pieces this module shares between its paths:

- **K smoothing** (``smooth_keys``): keys of trained transformers share a large
  channel-wise offset (every token's key has it), which makes per-block int8 scales
  coarse. Subtracting the mean key over the tokens changes every score of a query row by
  the same constant ``q · mean(k)``, and softmax is invariant to a constant per row:
  the exact attention is unchanged, only the quantization error shrinks.
- **Per-block quantization** (``quantize_per_block``): one float32 scale
  ``max|x| / 127`` per block of ``block`` tokens per (batch, head), rounding half away
  from zero, as SageAttention's ``quant_per_block_int8_kernel``. The softmax scale is
  folded into Q before quantizing (one multiply fewer in the inner loop).
- **Exact integer scores**: an int8·int8 dot over ``D`` channels is at most
  ``127² · D`` in magnitude, below 2²⁴ for ``D ≤ 1040``, so the torch reference computes
  it as a float32 matmul of the int8 values, bit-exactly the int32 the GPU's int8 tensor
  cores produce (and fast on CPU, where BLAS has no int8 GEMM).

Paths (``int8_attention(..., backend=...)``), q, k, v as ``[batch, heads, tokens, dim]``:

- ``"torch"``: the reference and the CPU path: dense scores per chunk of query blocks,
  float32 softmax, float32 P·V. It is *not faster* than PyTorch's fused SDPA on CPU
  (it does the same float32 matmuls plus the quantization); it is the definition and the
  test oracle.
- ``"sdpa"``: the same int8 values and scales, dequantized (``int8 * scale`` per block)
  and handed to PyTorch's fused SDPA with scale 1: the scores equal the reference's up to
  float32 rounding of the product order (about 1e-7 relative, far below the int8 error),
  without materializing the score matrix. The CPU path of the method: its cost over
  plain SDPA is the quantization alone. (The reference's unfused softmax was measured
  0.16x of SDPA at 4,096 tokens.)
- ``"triton"``: one program per (query block, batch*head) that loops over the key blocks
  with ``tl.dot`` on int8 operands (int32 accumulation), an online softmax in float32 and
  P (cast to V's dtype) · V accumulated in float32 — SageAttention's
  ``attn_qk_int8_per_block`` structure (base-e softmax here instead of its exp2 with
  log2(e) folded into Q). GPU path; runs on CPU under ``TRITON_INTERPRET=1`` (slow, for
  correctness only). Quantization is the same torch function for both paths, so the
  kernel test isolates the attention itself.
- ``"auto"``: triton for CUDA tensors when triton imports, else sdpa.

The fast GPU path of the ``int8_attention`` method is the ``sageattention`` package
through diffusers' ``sage`` attention backend, when installed; this module is what runs
everywhere else.
"""

from __future__ import annotations

import functools
import os

import torch

from kernels.sta import triton_available  # noqa: F401  (one check for both triton kernels; re-exported)

BACKENDS = ("auto", "torch", "sdpa", "triton")
BLOCK_SIZES = (16, 32, 64, 128)  # powers of two: tl.dot needs >= 16 and power-of-two tiles
INT8_MAX = 127.0
QUERY_CHUNK_BLOCKS = 8  # the torch path materializes scores for this many query blocks at a time


def smooth_keys(k: torch.Tensor) -> torch.Tensor:
    """``k`` minus its mean over the tokens (dim -2): the same scores up to a per-row constant."""
    return k - k.mean(dim=-2, keepdim=True)


def quantize_per_block(x: torch.Tensor, block: int, multiplier: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of ``x * multiplier`` with one scale per ``block`` tokens.

    Args:
        x: ``[batch, heads, tokens, dim]``.
        block: tokens per block (the last block may be partial).
        multiplier: folded in before quantizing (the softmax scale for Q).

    Returns:
        ``(values, scales)``: int8 ``[batch, heads, tokens, dim]`` and float32
        ``[batch, heads, ceil(tokens / block)]``; ``values * scale`` of its block
        approximates ``x * multiplier``.
    """
    b, h, n, d = x.shape
    blocks = -(-n // block)
    xf = x.float() * multiplier
    padded = torch.nn.functional.pad(xf, (0, 0, 0, blocks * block - n))
    grouped = padded.reshape(b, h, blocks, block * d)
    scales = (grouped.abs().amax(dim=-1) / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    scaled = grouped / scales[..., None]
    rounded = torch.trunc(scaled + 0.5 * torch.sign(scaled))  # half away from zero, as SageAttention
    values = rounded.clamp(-INT8_MAX, INT8_MAX).to(torch.int8).reshape(b, h, blocks * block, d)[:, :, :n]
    return values.contiguous(), scales


@functools.lru_cache(maxsize=1)
def _exact_float_dot_limit() -> int:
    return (2 ** 24) // int(INT8_MAX * INT8_MAX)


def quantize_qk(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, smooth: bool,
                scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q (softmax scale folded in) and K (smoothed when asked) as int8 per block, with scales."""
    q_int8, q_scale = quantize_per_block(q, block_q, scale)
    k_int8, k_scale = quantize_per_block(smooth_keys(k.float()) if smooth else k, block_k)
    return q_int8, q_scale, k_int8, k_scale


# ---------------------------------------------------------------------------- torch


def int8_attention_torch(q, k, v, block_q: int, block_k: int, smooth: bool, scale: float) -> torch.Tensor:
    """The reference: exact integer scores (float32 matmul of int8 values, see the module
    docstring), per-block rescaling, float32 softmax and P·V."""
    if q.shape[-1] > _exact_float_dot_limit():
        raise ValueError(f"head dim {q.shape[-1]} is too large for exact float32 int8 dots")
    q_int8, q_scale, k_int8, k_scale = quantize_qk(q, k, block_q, block_k, smooth, scale)
    n_q, n_k = q.shape[2], k.shape[2]
    row_scale = q_scale.repeat_interleave(block_q, dim=-1)[..., :n_q, None]
    col_scale = k_scale.repeat_interleave(block_k, dim=-1)[..., None, :n_k]
    keys_t, values = k_int8.float().transpose(-1, -2), v.float()
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    chunk = block_q * QUERY_CHUNK_BLOCKS
    for start in range(0, n_q, chunk):
        rows = slice(start, start + chunk)
        scores = torch.matmul(q_int8[:, :, rows].float(), keys_t) * row_scale[:, :, rows] * col_scale
        out[:, :, rows] = torch.matmul(scores.softmax(dim=-1), values)
    return out.to(q.dtype)


# ----------------------------------------------------------------------------- sdpa


def dequantize_per_block(values: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """float32 ``values * scale`` of each token's block."""
    return values.float() * scales.repeat_interleave(block, dim=-1)[..., : values.shape[2], None]


def int8_attention_sdpa(q, k, v, block_q: int, block_k: int, smooth: bool, scale: float) -> torch.Tensor:
    """The int8 scores through PyTorch's fused attention: dequantized Q and K, scale 1."""
    q_int8, q_scale, k_int8, k_scale = quantize_qk(q, k, block_q, block_k, smooth, scale)
    out = torch.nn.functional.scaled_dot_product_attention(
        dequantize_per_block(q_int8, q_scale, block_q), dequantize_per_block(k_int8, k_scale, block_k),
        v.float(), scale=1.0)
    return out.to(q.dtype)


# --------------------------------------------------------------------------- triton


@functools.lru_cache(maxsize=1)
def _triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def int8_attention_forward(Q, K, V, Q_SCALE, K_SCALE, O, n_q, n_k, blocks_q, blocks_k,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                               BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr):
        q_block = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        keys = tl.arange(0, BLOCK_N)
        row_ok = rows < n_q
        col_ok = cols < HEAD_DIM
        q = tl.load(Q + bh * n_q * HEAD_DIM + rows[:, None] * HEAD_DIM + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0)
        q_scale = tl.load(Q_SCALE + bh * blocks_q + q_block)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        kv_base = bh * n_k * HEAD_DIM
        for k_block in range(0, blocks_k):
            key_rows = k_block * BLOCK_N + keys
            key_ok = key_rows < n_k
            kv_off = key_rows[:, None] * HEAD_DIM + cols[None, :]
            kv_mask = key_ok[:, None] & col_ok[None, :]
            k = tl.load(K + kv_base + kv_off, mask=kv_mask, other=0)
            k_scale = tl.load(K_SCALE + bh * blocks_k + k_block)
            s = tl.dot(q, tl.trans(k)).to(tl.float32) * q_scale * k_scale  # int8 x int8 -> int32
            s = tl.where(key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + kv_base + kv_off, mask=kv_mask, other=0.0)
            if DOT_F32:
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(O + bh * n_q * HEAD_DIM + rows[:, None] * HEAD_DIM + cols[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    return int8_attention_forward


def _interpreted() -> bool:
    # triton's interpreter computes tl.dot on bfloat16 inputs wrongly (see kernels/sta.py),
    # so under TRITON_INTERPRET P and V go up to float32; on a GPU they stay in V's dtype.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def int8_attention_triton(q, k, v, block_q: int, block_k: int, smooth: bool, scale: float) -> torch.Tensor:
    import triton

    b, h, n_q, d = q.shape
    n_k = k.shape[2]
    q_int8, q_scale, k_int8, k_scale = quantize_qk(q, k, block_q, block_k, smooth, scale)
    flat = [x.reshape(b * h, -1, d).contiguous() for x in (q_int8, k_int8, v)]
    out = torch.empty(b * h, n_q, d, dtype=q.dtype, device=q.device)
    blocks_q, blocks_k = q_scale.shape[-1], k_scale.shape[-1]
    _triton_kernel()[(blocks_q, b * h)](
        *flat, q_scale.reshape(b * h, -1).contiguous(), k_scale.reshape(b * h, -1).contiguous(), out,
        n_q, n_k, blocks_q, blocks_k, BLOCK_M=block_q, BLOCK_N=block_k, HEAD_DIM=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)), DOT_F32=_interpreted(),
    )
    return out.reshape(b, h, n_q, d)


# --------------------------------------------------------------------------- public


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    return "triton" if device.type == "cuda" and triton_available() else "sdpa"


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int = 128, block_k: int = 64,
                   smooth: bool = True, backend: str = "auto", scale: float | None = None) -> torch.Tensor:
    """Softmax attention of ``q`` over ``k, v`` with int8 Q·Kᵀ (no mask, not causal).

    Args:
        q: ``[batch, heads, queries, dim]``; k, v: ``[batch, heads, keys, dim]``.
        block_q, block_k: tokens per quantization block of Q and K (SageAttention: 128, 64);
            one of ``BLOCK_SIZES``.
        smooth: subtract the mean key first (the paper's K smoothing).
        backend: ``"auto"``, ``"torch"`` (reference), ``"sdpa"`` (CPU), ``"triton"`` (GPU).
        scale: softmax scale, default ``dim ** -0.5``.

    Returns:
        ``[batch, heads, queries, dim]`` in the dtype of ``q``.

    Example::

        >>> q, k, v = (torch.randn(1, 2, 100, 32) for _ in range(3))
        >>> out = int8_attention(q, k, v, backend="torch")
        >>> (out - torch.nn.functional.scaled_dot_product_attention(q, k, v)).abs().max() < 0.05
        tensor(True)
    """
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q must be [batch, heads, queries, dim] and k, v [batch, heads, keys, dim]; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if block_q not in BLOCK_SIZES or block_k not in BLOCK_SIZES:
        raise ValueError(f"block sizes must be one of {BLOCK_SIZES}, got {block_q}, {block_k}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    name = resolve_backend(backend, q.device)
    if name == "triton":
        return int8_attention_triton(q, k, v, block_q, block_k, smooth, scale)
    if name == "sdpa":
        return int8_attention_sdpa(q, k, v, block_q, block_k, smooth, scale)
    return int8_attention_torch(q, k, v, block_q, block_k, smooth, scale)
