"""Sliding tile attention: the kernels against the torch reference, and the 'sta' method
on the tiny Wan pipeline.

The flex path is tested with eager flex_attention (same BlockMask and mask_mod as the
compiled path; compiling costs 20-100 s per shape on a busy 2-core machine). The compiled
path runs with FASTGEN_TEST_STA_COMPILE=1, and ``python -m benchmarks.sta_attention``
checks its output against masked dense attention on every run. The triton kernel runs
under TRITON_INTERPRET=1.
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
from kernels import sta  # noqa: E402
from kernels.sta import kept_fraction, sliding_tile_attention, token_mask  # noqa: E402

# (grid, tile, window): divisible, padded on every axis, window clamped at borders,
# window larger than the tile grid on one axis, tile larger than the grid.
CASES = [
    ((4, 8, 8), (2, 4, 4), (1, 1, 1)),
    ((3, 5, 7), (2, 4, 4), (1, 1, 3)),
    ((4, 8, 12), (2, 4, 4), (1, 1, 3)),
    ((5, 6, 10), (2, 2, 4), (3, 1, 3)),
    ((2, 6, 6), (4, 2, 2), (1, 5, 3)),
]
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _qkv(grid, dtype, batch=1, heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1] * grid[2]
    return [torch.randn(batch, heads, n, dim, generator=g).to(dtype) for _ in range(3)]


@pytest.fixture(autouse=True, scope="module")
def eager_flex():
    compiled = os.environ.get("FASTGEN_TEST_STA_COMPILE") == "1"
    sta.set_flex_compile(compiled)
    yield compiled
    sta._FLEX_STATE.clear()


@pytest.fixture
def interpreted_triton():
    if not sta.triton_available():
        pytest.skip("triton is not installed (pip install triton): the triton kernel is not tested")
    import triton.language as tl

    if os.environ.get("TRITON_INTERPRET") != "1" or type(tl.zeros).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported without TRITON_INTERPRET=1 in this process: cannot run it on CPU")


# ------------------------------------------------------------------------ the mask


def test_kept_fraction_matches_the_mask():
    assert kept_fraction((8, 24, 40), (2, 4, 8), (3, 3, 3)) == pytest.approx(0.225)  # (3/4)(3/6)(3/5)
    assert kept_fraction((16, 48, 80), (4, 8, 8), (3, 3, 3)) == pytest.approx(0.75 * 0.5 * 0.3)
    assert kept_fraction((4, 8, 8), (2, 4, 4), (2, 2, 2)) == 1.0  # window covers the tile grid
    for grid, tile, window in CASES:
        assert kept_fraction(grid, tile, window) == pytest.approx(token_mask(grid, tile, window).float().mean().item())


def test_window_is_shifted_inside_the_grid():
    # Whole tiles: every query sees the same number of keys, at the borders too.
    mask = token_mask((6, 8, 12), (2, 2, 4), (3, 3, 1))
    assert (mask.sum(1) == mask.sum(1)[0]).all()
    assert mask.sum(1)[0].item() == (3 * 2) * (3 * 2) * 4
    # Centred in the middle: query tile 1 of 4 along T sees tiles 0..2, tile 0 sees 0..2 too.
    lay = sta.tile_layout((8, 1, 1), (2, 1, 1), (3, 1, 1))
    assert lay.window_starts(0) == [0, 0, 1, 1]


def test_tile_major_round_trip():
    lay = sta.tile_layout((3, 5, 7), (2, 4, 4), (1, 1, 1))
    x = torch.randn(2, 3, lay.num_tokens, 4)
    tiles = lay.to_tiles(x)
    assert tiles.shape[2] == lay.num_padded == 4 * 8 * 8
    assert torch.equal(lay.from_tiles(tiles), x)
    assert lay.valid_tokens().sum().item() == lay.num_tokens


# ------------------------------------------------------------------ kernels vs oracle


@pytest.mark.parametrize("backend", ["flex", "sdpa"])
@pytest.mark.parametrize("grid,tile,window,dtype",
                         [(*case, torch.float32) for case in CASES] + [(*CASES[i], torch.bfloat16) for i in (1, 4)])
def test_flex_and_grouped_sdpa_match_reference(grid, tile, window, dtype, backend):
    q, k, v = _qkv(grid, dtype)
    ref = sliding_tile_attention(q, k, v, grid, tile, window, backend="torch")
    out = sliding_tile_attention(q, k, v, grid, tile, window, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("grid,tile,window", [CASES[0], CASES[1], CASES[4]])
def test_triton_matches_reference(grid, tile, window, dtype, interpreted_triton):
    q, k, v = _qkv(grid, dtype)
    ref = sliding_tile_attention(q, k, v, grid, tile, window, backend="torch")
    out = sliding_tile_attention(q, k, v, grid, tile, window, backend="triton")
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("backend", ["torch", "flex", "sdpa", "triton"])
def test_window_covering_the_grid_is_dense_attention(backend, request):
    if backend == "triton":
        request.getfixturevalue("interpreted_triton")
    grid = (3, 5, 7)
    q, k, v = _qkv(grid, torch.float32, batch=2)
    dense = F.scaled_dot_product_attention(q, k, v)
    out = sliding_tile_attention(q, k, v, grid, (2, 4, 4), (2, 2, 2), backend=backend)
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=2e-5)


def test_bad_shapes_and_backends_are_refused():
    q, k, v = _qkv((2, 4, 4), torch.float32)
    with pytest.raises(ValueError, match="grid"):
        sliding_tile_attention(q, k, v, (2, 4, 5), (1, 2, 2), (1, 1, 1))
    with pytest.raises(ValueError, match="backend"):
        sliding_tile_attention(q, k, v, (2, 4, 4), (1, 2, 2), (1, 1, 1), backend="cuda")
    assert sta.resolve_backend("auto", torch.device("cpu")) == "flex"


# ---------------------------------------------------------- the method on tiny Wan

STA_PARAMS = dict(tile_t=1, tile_h=4, tile_w=4, window_t=3, window_h=1, window_w=1, full_attention_steps=0,
                  backend="flex")


@pytest.fixture(scope="module")
def wan():
    from backends.manager import BackendManager
    from backends.tiny.dummy_video import register_dummy_video_models

    manager = BackendManager(device="cpu", dtype=torch.float32)
    register_dummy_video_models(manager)
    return manager.get("video", "dummy-wan")


def _request(methods=(), steps=2):
    return Request("video", "dummy-wan", "a red circle", seed=1, params={"steps": steps, "guidance": 3.0},
                   methods=[MethodChoice(name, params) for name, params in methods])


def _frames(result) -> np.ndarray:
    return np.stack([np.asarray(frame) for frame in result.output])


def test_dummy_wan_makes_frames(wan):
    assert wan.family == "video-dit"
    result = wan.run(_request())
    assert len(result.output) == 9 and result.output[0].size == (64, 64)
    assert result.model_evals == 4  # 2 steps x (cond + uncond)


def test_sta_computes_fewer_pairs_changes_output_and_removes_cleanly(wan):
    originals = [m.processor for m in sta_method_modules(wan)]
    baseline = _frames(wan.run(_request()))
    result = wan.run(_request([("sta", STA_PARAMS)]))
    stats = result.method_stats["sta"]
    assert stats["grid"] == "3x8x8" and stats["sta_calls"] == 2 * 2 * 2  # layers x steps x CFG branches
    assert stats["full_calls"] == 0
    assert stats["kept_fraction"] == pytest.approx(0.25)
    assert stats["attention_pairs"] == pytest.approx(0.25 * stats["dense_attention_pairs"], rel=1e-6)
    assert not np.array_equal(_frames(result), baseline)
    assert [m.processor for m in sta_method_modules(wan)] == originals  # the very same objects
    assert all(type(p).__name__ == "WanAttnProcessor" for p in originals)
    assert np.array_equal(_frames(wan.run(_request())), baseline)


def test_sta_full_attention_steps_and_full_window(wan):
    baseline = _frames(wan.run(_request()))
    dense_first = wan.run(_request([("sta", dict(STA_PARAMS, full_attention_steps=1))])).method_stats["sta"]
    assert dense_first["sta_calls"] == 4 and dense_first["full_calls"] == 4
    assert 0.25 < dense_first["pairs_fraction"] < 1
    # A window over the whole tile grid is dense attention: same frames up to rounding.
    wide = wan.run(_request([("sta", dict(STA_PARAMS, window_h=2, window_w=2))]))
    assert wide.method_stats["sta"]["kept_fraction"] == 1.0
    assert np.abs(_frames(wide).astype(int) - baseline).max() <= 1


def test_sta_refuses_bad_combinations(wan):
    with pytest.raises(ValidationError, match="cannot be combined"):
        wan.run(_request([("sta", STA_PARAMS), ("attention_backend", {})]))
    notes = wan.run(_request([("sta", dict(STA_PARAMS, full_attention_steps=5))])).notes
    assert any("never applies" in note for note in notes)


def test_diffusers_caches_run_on_dummy_wan(wan):
    baseline = _frames(wan.run(_request(steps=4)))
    for cache in ("first_block_cache", "mag_cache"):
        result = wan.run(_request([(cache, {}), ("sta", STA_PARAMS)], steps=4))
        assert result.method_stats[cache]["denoiser_calls"] == 8
        assert result.method_stats["sta"]["sta_calls"] > 0
    assert result.method_stats["mag_cache"]["skipped_calls"] > 0
    assert np.array_equal(_frames(wan.run(_request(steps=4))), baseline)


def sta_method_modules(backend):
    from backends.accel.sta import self_attention_modules

    return self_attention_modules(backend.denoiser)


def test_adacache_on_video_measures_motion_and_motion_shortens_reuse(wan):
    baseline = _frames(wan.run(_request(steps=10)))
    loose = dict(scale=1.0, max_reuse=4, warmup_steps=2)
    plain = wan.run(_request([("adacache", dict(loose, moreg=False))], steps=10)).method_stats["adacache"]
    moreg = wan.run(_request([("adacache", dict(loose, moreg=True, moreg_strength=10.0))], steps=10))
    stats = moreg.method_stats["adacache"]
    assert stats["frames"] == 3 and stats["mean_motion"] > 0  # 9 frames -> 3 latent frames after patching
    assert plain["mean_motion"] is None and plain["skipped_steps"] > 0
    assert stats["skipped_steps"] < plain["skipped_steps"]  # the same clip, motion counted: less reuse
    assert max(stats["reuse_plan"]) < max(plain["reuse_plan"])
    assert stats["computed_steps"] + stats["skipped_steps"] == 10 and stats["branches"] == 2
    assert np.array_equal(_frames(wan.run(_request(steps=10))), baseline)
