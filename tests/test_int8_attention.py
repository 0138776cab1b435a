"""INT8 attention (SageAttention): the triton kernel against the torch reference, the
reference against exact attention, and the 'int8_attention' method on the bundled FLUX
model and the dummy Wan pipeline.

The triton kernel runs under TRITON_INTERPRET=1 (CPU, numpy); the ``sage`` fast path (the
sageattention package through diffusers' dispatcher) needs a CUDA GPU and is not tested here.
"""

from __future__ import annotations

import os

# Triton decides at import whether its own library functions are interpreted, so this
# must be set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(1)

from backends.types import MethodChoice, Request, ValidationError  # noqa: E402
from kernels import int8_attention as kernel  # noqa: E402
from kernels.int8_attention import int8_attention, quantize_per_block, smooth_keys  # noqa: E402

# (queries, keys, dim, block_q, block_k): whole blocks, partial last blocks, cross
# attention (fewer keys than queries), a head dim that is not a power of two.
CASES = [
    (128, 128, 32, 64, 32),
    (100, 77, 24, 32, 16),
    (37, 160, 64, 16, 64),
    (200, 16, 40, 128, 64),
]


def _qkv(n_q, n_k, dim, dtype=torch.float32, key_offset=0.0, seed=0, heads=2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, n_q, dim, generator=g)
    k = torch.randn(2, heads, n_k, dim, generator=g) + key_offset * torch.randn(dim, generator=g)
    v = torch.randn(2, heads, n_k, dim, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.fixture
def interpreted_triton():
    if not kernel.triton_available():
        pytest.skip("triton is not installed (pip install triton): the triton kernel is not tested")
    import triton.language as tl

    if os.environ.get("TRITON_INTERPRET") != "1" or type(tl.zeros).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported without TRITON_INTERPRET=1 in this process: cannot run it on CPU")


# ----------------------------------------------------------------- quantization


def test_quantize_per_block_scales_and_round_trip():
    x = torch.randn(1, 2, 70, 8) * torch.tensor([1.0, 10.0]).view(1, 2, 1, 1)
    values, scales = quantize_per_block(x, 32)
    assert values.dtype == torch.int8 and values.shape == x.shape and scales.shape == (1, 2, 3)
    assert values.abs().max() == 127  # every block's largest value maps to +-127
    blockwise = scales.repeat_interleave(32, dim=-1)[..., :70, None]
    error = (values.float() * blockwise - x).abs()
    assert (error <= blockwise / 2 + 1e-6).all()  # at most half a step per element
    assert scales[0, 1].mean() > 5 * scales[0, 0].mean()  # one scale per block and head


def test_smoothing_leaves_exact_attention_unchanged():
    q, k, v = _qkv(50, 60, 16, key_offset=4.0)
    exact = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, smooth_keys(k), v), exact, atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------- reference vs exact


@pytest.mark.parametrize("n_q,n_k,dim,block_q,block_k", CASES)
def test_reference_is_close_to_exact_attention(n_q, n_k, dim, block_q, block_k):
    q, k, v = _qkv(n_q, n_k, dim, key_offset=2.0)
    exact = F.scaled_dot_product_attention(q, k, v)
    out = int8_attention(q, k, v, block_q, block_k, backend="torch")
    error = (out - exact).abs()
    assert 0 < error.max() < 0.05, error.max()  # quantized (not exact), yet close
    assert error.mean() < 0.005


def test_smoothing_shrinks_the_error_of_offset_keys():
    q, k, v = _qkv(128, 128, 32, key_offset=8.0)
    exact = F.scaled_dot_product_attention(q, k, v)
    smooth = (int8_attention(q, k, v, smooth=True, backend="torch") - exact).abs().mean()
    plain = (int8_attention(q, k, v, smooth=False, backend="torch") - exact).abs().mean()
    assert smooth < plain / 2, (smooth, plain)


def test_reference_scores_are_the_integer_dot_products():
    """The float32 matmul of int8 values is the exact int32 dot (the reference's shortcut)."""
    q, k, _ = _qkv(64, 64, 64, seed=3)
    qi, _, ki, _ = kernel.quantize_qk(q, k, 64, 64, smooth=True, scale=0.125)
    exact = torch.einsum("bhqd,bhkd->bhqk", qi.to(torch.int64), ki.to(torch.int64))
    assert torch.equal(torch.matmul(qi.float(), ki.float().transpose(-1, -2)).to(torch.int64), exact)


# --------------------------------------------------------------- triton vs torch


@pytest.mark.parametrize("n_q,n_k,dim,block_q,block_k", CASES)
def test_triton_matches_reference(n_q, n_k, dim, block_q, block_k, interpreted_triton):
    q, k, v = _qkv(n_q, n_k, dim, key_offset=2.0)
    ref = int8_attention(q, k, v, block_q, block_k, backend="torch")
    out = int8_attention(q, k, v, block_q, block_k, backend="triton")
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_triton_bf16_and_no_smoothing(interpreted_triton):
    q, k, v = _qkv(100, 70, 32, dtype=torch.bfloat16, key_offset=2.0)
    for smooth in (True, False):
        ref = int8_attention(q, k, v, 32, 32, smooth=smooth, backend="torch")
        out = int8_attention(q, k, v, 32, 32, smooth=smooth, backend="triton")
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("n_q,n_k,dim,block_q,block_k", CASES[:2])
def test_fused_sdpa_path_matches_reference(n_q, n_k, dim, block_q, block_k):
    q, k, v = _qkv(n_q, n_k, dim, key_offset=2.0)
    ref = int8_attention(q, k, v, block_q, block_k, backend="torch")
    out = int8_attention(q, k, v, block_q, block_k, backend="sdpa")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert not torch.equal(out, F.scaled_dot_product_attention(q, k, v))


def test_bad_arguments_are_refused():
    q, k, v = _qkv(10, 10, 8)
    with pytest.raises(ValueError, match="block sizes"):
        int8_attention(q, k, v, block_q=48)
    with pytest.raises(ValueError, match="backend"):
        int8_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="dim"):
        int8_attention(q, k[..., :4], v)
    assert kernel.resolve_backend("auto", torch.device("cpu")) == "sdpa"


# ------------------------------------------------------------------- the method

FLUX_DIR = __import__("pathlib").Path(__file__).resolve().parents[1] / "assets" / "tiny-flux-shapes"


@pytest.fixture(scope="module")
def tiny_flux():
    if not (FLUX_DIR / "model_index.json").exists():
        pytest.skip("assets/tiny-flux-shapes not built")
    from backends.manager import BackendManager

    return BackendManager(device="cpu", dtype=torch.float32).get("image", "tiny-flux-shapes")


def _image_request(methods=()):
    return Request("image", "tiny-flux-shapes", "a red circle at top left on white", seed=2,
                   params={"steps": 4, "guidance": 4.0},
                   methods=[MethodChoice(name, dict(params)) for name, params in methods])


def test_int8_attention_on_tiny_flux_is_close_and_removes_exactly(tiny_flux):
    from studio.metrics import PSNR_IDENTICAL, psnr

    processors = [m.processor for m in _attention_modules(tiny_flux)]
    baseline = np.asarray(tiny_flux.run(_image_request()).output)
    result = tiny_flux.run(_image_request([("int8_attention", {})]))
    stats = result.method_stats["int8_attention"]
    assert stats["int8_calls"] > 0 and stats["fallback_calls"] == 0 and stats["processors"] == len(processors)
    assert stats["kernel"] == "sdpa"
    quality = psnr(baseline, np.asarray(result.output))
    assert 30 < quality < PSNR_IDENTICAL, quality  # changed, slightly
    assert [m.processor for m in _attention_modules(tiny_flux)] == processors  # the very same objects
    assert np.array_equal(np.asarray(tiny_flux.run(_image_request()).output), baseline)


def test_int8_attention_refuses_gpu_kernels_on_cpu_and_conflicts(tiny_flux):
    with pytest.raises(ValidationError, match="needs a CUDA GPU"):
        tiny_flux.run(_image_request([("int8_attention", {"kernel": "sage"})]))
    with pytest.raises(ValidationError, match="cannot be combined"):
        tiny_flux.run(_image_request([("int8_attention", {}), ("attention_backend", {})]))
    with pytest.raises(ValidationError, match="must be one of"):
        tiny_flux.run(_image_request([("int8_attention", {"block_q": 48})]))


def test_int8_attention_on_video_dit_counts_self_and_cross_attention():
    from backends.manager import BackendManager
    from backends.tiny.dummy_video import register_dummy_video_models

    manager = BackendManager(device="cpu", dtype=torch.float32)
    register_dummy_video_models(manager)
    wan = manager.get("video", "dummy-wan")

    def frames(methods=()):
        request = Request("video", "dummy-wan", "a red circle", seed=1, params={"steps": 2, "guidance": 3.0},
                          methods=[MethodChoice(name, params) for name, params in methods])
        return wan.run(request)

    baseline = np.stack([np.asarray(f) for f in frames().output])
    result = frames([("int8_attention", {"block_q": 64, "block_k": 32})])
    stats = result.method_stats["int8_attention"]
    # 2 blocks x (self + cross) x 2 steps x (cond + uncond)
    assert stats["int8_calls"] == 16 and stats["processors"] == 4, stats
    assert not np.array_equal(np.stack([np.asarray(f) for f in result.output]), baseline)
    assert np.array_equal(np.stack([np.asarray(f) for f in frames().output]), baseline)


def _attention_modules(backend):
    from backends.accel.int8_attention import attention_modules

    return attention_modules(backend.denoiser)


def test_auto_picks_sage_only_where_diffusers_sage_backend_can_run(tiny_flux, monkeypatch):
    """The GPU choice, decided without a GPU: sage needs the package, CUDA, half precision
    and dispatched processors (FLUX yes, the UNet's SDPA processors no)."""
    from backends.accel import int8_attention as method
    from backends.tiny.dummy import dummy_sd_pipeline

    cuda, flux = torch.device("cuda"), tiny_flux.denoiser
    monkeypatch.setattr(method, "sage_installed", lambda: True)
    monkeypatch.setattr(kernel, "triton_available", lambda: True)
    assert method.resolve_kernel("auto", cuda, flux, torch.bfloat16) == "sage"
    assert method.resolve_kernel("auto", cuda, flux, torch.float32) == "triton"
    assert method.resolve_kernel("auto", cuda, dummy_sd_pipeline().unet, torch.float16) == "triton"
    assert method.resolve_kernel("auto", torch.device("cpu"), flux, torch.bfloat16) == "sdpa"
    monkeypatch.setattr(method, "sage_installed", lambda: False)
    assert method.resolve_kernel("auto", cuda, flux, torch.bfloat16) == "triton"
    with pytest.raises(ValidationError, match="needs the sageattention package"):
        method.resolve_kernel("sage", cuda, flux, torch.bfloat16)
