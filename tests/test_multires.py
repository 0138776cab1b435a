"""Bottleneck Sampling and RALU (issue 19 items 3 and 4): denoising steps on a smaller latent.

For each: removing it restores the baseline bit-identically; it changes the work done
(calls at a lower resolution, fewer token evaluations, partial calls on the cost meter);
it refuses the models it cannot apply to with one line. The shared machinery
(``backends/accel/_multires.py``) is checked where its claims are exact: the strided slice
undoes nearest upsampling, RALU's correlated noise whitens upsampled noise, the low calls
get the smaller grid's positions.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from backends.accel._multires import (block_correlated_noise, down_nearest, lift_noise,  # noqa: E402
                                      stage_sigmas, up_nearest)
from backends.image import ImageBackend  # noqa: E402
from backends.tiny.dummy import dummy_flux_pipeline, dummy_sd_pipeline  # noqa: E402
from backends.types import MethodChoice, Request, ValidationError  # noqa: E402

STEPS = 8


@pytest.fixture(scope="module")
def flux():
    return ImageBackend("dummy-flux", dummy_flux_pipeline(), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def wan():
    from backends.tiny.dummy_video import dummy_wan_pipeline
    from backends.video import VideoBackend

    return VideoBackend("dummy-wan", dummy_wan_pipeline(), torch.device("cpu"), torch.float32)


def request(backend, methods=(), steps=STEPS):
    return Request(backend.modality, backend.model_id, "a red circle", seed=5,
                   params={"steps": steps, "guidance": 4.0},
                   methods=[MethodChoice(name, dict(params)) for name, params in methods])


def pixels(result) -> np.ndarray:
    out = result.output
    return np.stack([np.asarray(f) for f in out]) if isinstance(out, list) else np.asarray(out)


def run_and_restore(backend, methods):
    """Baseline, the method, baseline again: the two baselines must be bit-identical."""
    base = backend.run(request(backend))
    result = backend.run(request(backend, methods))
    again = backend.run(request(backend))
    assert np.array_equal(pixels(base), pixels(again)), f"{methods}: baseline changed after apply + remove"
    assert not np.array_equal(pixels(base), pixels(result)), f"{methods} did not change the output"
    return base, result


def assert_less_full_resolution_work(stats: dict, baseline_calls: int) -> None:
    assert stats["low_res_calls"] + stats["mixed_res_calls"] > 0, stats
    assert stats["token_evals"] < stats["token_evals_at_full_res"], stats
    # the cost meter files the lower-resolution calls as partial, so fewer calls ran at full size
    assert stats["evals_partial"] == stats["low_res_calls"] + stats["mixed_res_calls"] > 0, stats
    assert stats["evals_full"] == stats["full_res_calls"] < baseline_calls, stats
    assert stats["ideal_speedup"] is not None


def test_bottleneck_sampling_runs_the_middle_steps_smaller_and_removes_cleanly(flux):
    base, result = run_and_restore(flux, [("bottleneck_sampling", {})])
    stats = result.method_stats["bottleneck_sampling"]
    assert stats["stage_factors"] == [1, 2, 1] and sum(stats["stage_steps"]) == STEPS, stats
    assert_less_full_resolution_work(stats, base.model_evals)
    # a 2x smaller side is a quarter of the tokens in each low call
    per_low = (stats["token_evals"] - stats["full_res_calls"] * 16) / stats["low_res_calls"]
    assert per_low == 4, stats


def test_bottleneck_sampling_on_a_wan_video_transformer(wan):
    base, result = run_and_restore(wan, [("bottleneck_sampling", {"low_start": 0.25, "low_end": 0.75})])
    stats = result.method_stats["bottleneck_sampling"]
    assert_less_full_resolution_work(stats, base.model_evals)
    assert stats["stage_steps"] == [2, 4, 2], stats


def test_ralu_upsamples_edge_regions_first_and_removes_cleanly(flux):
    base, result = run_and_restore(flux, [("ralu", {"up_ratio": 0.5})])
    stats = result.method_stats["ralu"]
    assert stats["stage_steps"] == [5, 6, 7] and stats["stage_factors"] == [2, 2, 1], stats
    assert stats["low_res_calls"] > 0 and stats["mixed_res_calls"] > 0, stats
    assert stats["upsampled_early"] == 2, stats  # half of the 2x2 low-resolution tokens
    assert result.model_evals == 2 * 18  # RALU's own 18 steps, two CFG passes each
    assert_less_full_resolution_work(stats, 2 * 18)


def test_low_calls_see_the_smaller_grid_and_its_positions(flux):
    """What the transformer's forward receives (after the method's pre-hook): 4x4 tokens at
    rows 0..3 at full size, 2x2 tokens at rows 0..1 in the low stage."""
    captured: list[tuple[int, float]] = []
    denoiser = flux.denoiser
    original = denoiser.forward

    def spy(*args, **kwargs):
        captured.append((kwargs["hidden_states"].shape[1], float(kwargs["img_ids"][:, 1:].max())))
        return original(*args, **kwargs)

    denoiser.forward = spy
    try:
        flux.run(request(flux, [("bottleneck_sampling", {"low_start": 0.25, "low_end": 0.75})], steps=4))
    finally:
        del denoiser.forward
    assert captured == [(16, 3.0)] * 2 + [(4, 1.0)] * 4 + [(16, 3.0)] * 2, captured


def test_refusals_are_one_line(flux, wan):
    sd = ImageBackend("dummy-sd", dummy_sd_pipeline(), torch.device("cpu"), torch.float32)
    for backend, name in ((sd, "bottleneck_sampling"), (sd, "ralu"), (wan, "ralu")):
        with pytest.raises(ValidationError) as err:
            backend.run(request(backend, [(name, {})]))
        assert "\n" not in str(err.value) and name in str(err.value)
    with pytest.raises(ValidationError, match="stage"):
        flux.run(request(flux, [("bottleneck_sampling", {})], steps=1))


def test_strided_slice_undoes_nearest_upsampling_exactly():
    low = torch.randn(2, 4, 3, 5, 6)
    assert torch.equal(down_nearest(up_nearest(low, 2), 2), low)


def test_ralu_correlated_noise_whitens_upsampled_noise():
    gen = torch.Generator().manual_seed(0)
    z = 3.0
    n = 40000
    up = up_nearest(torch.randn(n, 1, 1, 1, generator=gen), 2)
    total = up / z + block_correlated_noise((n, 1, 2, 2), 2, z, gen, torch.device("cpu"))
    cov = torch.cov(total.reshape(n, 4).T)
    assert torch.allclose(cov, torch.eye(4), atol=0.03), cov


def test_rescheduled_sigma_multiplies_the_noise_to_signal_ratio():
    sigma = 0.7
    lifted = lift_noise(sigma, 6.317)
    assert lifted / (1 - lifted) == pytest.approx(6.317 * sigma / (1 - sigma))
    # RALU's time terms: e = 0.3 ends stage 1, the next starts at s = e / (Z (1 - e) + e)
    assert 1 - lifted == pytest.approx(0.3 / (6.317 * 0.7 + 0.3))
    grid = stage_sigmas(0.9, 0.2, 4, 3.0)
    assert grid[0] == pytest.approx(0.9) and grid[-1] == pytest.approx(0.2) and len(grid) == 5


def test_scaled_positions_put_low_tokens_at_the_full_grid_coordinates(flux, wan):
    """Position interpolation: a FLUX low call's tokens sit at the centres of the 2x2 full
    tokens they cover (0.5, 2.5); a Wan low call gets the full grid's rotary table at every
    other row and column."""
    captured: list[torch.Tensor] = []
    denoiser = flux.denoiser
    original = denoiser.forward

    def spy(*args, **kwargs):
        captured.append(kwargs["img_ids"].clone())
        return original(*args, **kwargs)

    denoiser.forward = spy
    try:
        flux.run(request(flux, [("bottleneck_sampling", {"low_start": 0.25, "low_end": 0.75,
                                                          "positions": "scaled"})], steps=4))
    finally:
        del denoiser.forward
    low = [ids for ids in captured if len(ids) == 4]
    assert low and sorted(set(low[0][:, 1].tolist())) == [0.5, 2.5], low[0]

    from backends.accel._multires import WanLayout
    from backends.plan import RunHandle

    rope = wan.denoiser.rope
    full = rope(torch.empty(1, 16, 3, 8, 8))[0].reshape(3, 8, 8, -1)
    run = SimpleNamespace(call_factor=2, backend=wan)
    handle = RunHandle(None)
    WanLayout((1, 1, 1), scaled_positions=True).attach(run, handle)
    try:
        low_table = rope(torch.empty(1, 16, 3, 4, 4))[0]
        run.call_factor = 1
        own_table = rope(torch.empty(1, 16, 3, 4, 4))[0]
    finally:
        handle.remove()
    assert torch.equal(low_table.reshape(3, 4, 4, -1), full[:, ::2, ::2])
    assert torch.equal(own_table.reshape(3, 4, 4, -1), full[:, :4, :4])  # a full-size call: untouched
    assert not rope._forward_hooks


def test_two_methods_patching_the_scheduler_unwind_to_the_class_methods(flux):
    """A method that patches ``scheduler.set_timesteps`` first (as Approximate Caching does
    on a cache hit), then Bottleneck Sampling over it: removed in the run's order (the last
    attached first), each puts back what was there before it, so no instance attribute is
    left and the class methods are in force again (a ``delattr`` wiped the first patch and
    made the first method's own removal raise)."""
    from backends.accel._patch import patch_attr
    from backends.accel.base import instantiate
    from backends.plan import RunHandle, attached

    class EarlierPatch:
        def attach(self, backend, plan):
            handle = RunHandle(plan)
            original = backend.pipe.scheduler.set_timesteps
            patch_attr(handle, backend.pipe.scheduler, "set_timesteps", lambda *a, **k: original(*a, **k))
            return handle

    req = request(flux, [("bottleneck_sampling", {})])
    scheduler = flux.pipe.scheduler
    before = set(vars(scheduler))
    methods = [EarlierPatch()] + instantiate(req.methods, flux.modality, flux.family)
    earlier, bottleneck = methods
    plan = flux.build_plan(req)
    first = earlier.attach(flux, plan)
    patched = vars(scheduler)["set_timesteps"]
    with attached(flux, plan, [bottleneck]):
        assert vars(scheduler)["set_timesteps"] is not patched and "step" in vars(scheduler)
    assert vars(scheduler)["set_timesteps"] is patched  # the earlier patch is back, not wiped
    first.remove()
    assert set(vars(scheduler)) == before
    assert scheduler.set_timesteps.__func__ is type(scheduler).set_timesteps
    assert scheduler.step.__func__ is type(scheduler).step


def test_patch_attr_tolerates_an_attribute_already_gone():
    from backends.accel._patch import patch_attr
    from backends.plan import RunHandle

    obj = SimpleNamespace()
    handle = RunHandle(None)
    patch_attr(handle, obj, "step", 1)
    del obj.step
    handle.remove()
    assert "step" not in vars(obj)
