"""RAS (region-adaptive sampling) and BAC (block-wise adaptive caching), issue 19 items 2 and 5.

For each: removal leaves the baseline bit-identical; the method changes the work done (fewer
image tokens through the transformer / fewer sub-block evaluations, measured by the cost
meter as partial calls) and the output. RAS's token slicing is checked exact: sending every
token, in a shuffled order, through the sliced path must give the baseline, which only holds
when the hidden states and the RoPE positions are sliced consistently. BAC's scheduler
(dynamic programming, Bubbling Union) is checked on hand-made similarity matrices.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from backends.image import ImageBackend  # noqa: E402
from backends.tiny.dummy import dummy_flux_pipeline, dummy_sd_pipeline  # noqa: E402
from backends.types import MethodChoice, Request  # noqa: E402

STEPS = 8
RAS_FAST = {"warmup_steps": 2, "reset_every": 4, "sample_ratio": 0.5}


@pytest.fixture(scope="module")
def flux():
    return ImageBackend("dummy-flux", dummy_flux_pipeline(), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def wan():
    from backends.tiny.dummy_video import dummy_wan_pipeline
    from backends.video import VideoBackend

    return VideoBackend("dummy-wan", dummy_wan_pipeline(), torch.device("cpu"), torch.float32)


def request(backend, methods=(), steps=STEPS):
    modality = "video" if backend.model_id == "dummy-wan" else "image"
    return Request(modality, backend.model_id, "a red circle", seed=3, params={"steps": steps, "guidance": 4.0},
                   methods=[MethodChoice(name, dict(params)) for name, params in methods])


def frames(result) -> list[np.ndarray]:
    output = result.output if isinstance(result.output, list) else [result.output]
    return [np.asarray(frame) for frame in output]


def same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(frames(a), frames(b)))


def run_and_restore(backend, methods, steps=STEPS):
    """Baseline, the method, baseline again: the baselines must be bit-identical."""
    base = backend.run(request(backend, steps=steps))
    result = backend.run(request(backend, methods, steps=steps))
    again = backend.run(request(backend, steps=steps))
    assert same(base, again), f"{methods}: the baseline changed after apply + remove"
    return base, result


# ----------------------------------------------------------------------------- RAS


def check_ras(backend):
    base, result = run_and_restore(backend, [("ras", RAS_FAST)])
    stats = result.method_stats["ras"]
    # steps 0, 1 (warm-up) and 6 (reset) are full; the others send half the image tokens
    assert stats["full_calls"] > 0 and stats["ras_calls"] > 0, stats
    assert stats["token_evals"] < stats["dense_token_evals"], stats
    assert stats["evals_partial"] == stats["ras_calls"] and stats["ideal_speedup"] is not None, stats
    assert stats["kv_reused_calls"] > 0, stats  # dropped tokens' keys/values stayed in attention
    assert not same(base, result), "ras did not change the output"
    return stats


def test_ras_on_flux_computes_fewer_tokens_and_restores_the_baseline(flux):
    stats = check_ras(flux)
    calls_per_step = 2  # true CFG: cond and uncond passes
    assert stats["full_calls"] == 3 * calls_per_step and stats["ras_calls"] == 5 * calls_per_step


def test_ras_on_wan_computes_fewer_tokens_and_restores_the_baseline(wan):
    check_ras(wan)


@pytest.mark.parametrize("model", ["flux", "wan"])
def test_ras_slicing_keeps_tokens_and_rope_positions_together(model, flux, wan, monkeypatch):
    """Every RAS step sends all the tokens, shuffled, through the sliced path: attention and
    the per-token layers do not care about order, so the output is the baseline's, up to
    float rounding, only if each token keeps its own rotary position."""
    import backends.accel.ras as ras

    backend = flux if model == "flux" else wan

    def every_token_shuffled(update, drops, config):
        generator = torch.Generator().manual_seed(int(drops.sum()))
        return torch.randperm(update.shape[1], generator=generator)

    monkeypatch.setattr(ras, "select_tokens", every_token_shuffled)
    base = backend.run(request(backend))
    sliced = backend.run(request(backend, [("ras", RAS_FAST)]))
    assert sliced.method_stats["ras"]["ras_calls"] > 0
    for a, b in zip(frames(base), frames(sliced)):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_ras_select_tokens_keeps_the_focus_end_and_lifts_starved_tokens():
    from backends.accel.ras import RASConfig, select_tokens

    update = torch.zeros(1, 4, 8)
    update[0, :, 0] = torch.tensor([4.0, 1.0, 3.0, 2.0])  # std over channels grows with this value
    never_starved = torch.zeros(4)
    assert select_tokens(update, never_starved, RASConfig(sample_ratio=0.5)).tolist() == [0, 2]
    assert select_tokens(update, never_starved, RASConfig(sample_ratio=0.5, focus="low")).tolist() == [1, 3]
    starved = torch.tensor([0.0, 0.0, 0.0, 5.0])  # token 3 was dropped five times
    assert select_tokens(update, starved, RASConfig(sample_ratio=0.5, starvation_scale=1.0)).tolist() == [0, 3]
    starved = torch.tensor([0.0, 0.0, 5.0, 0.0])
    assert select_tokens(update, starved, RASConfig(sample_ratio=0.5, starvation_scale=1.0,
                                                    focus="low")).tolist() == [1, 2]


def test_ras_full_step_schedule_is_the_papers():
    from backends.accel.ras import RASConfig, is_full_step

    full = [s for s in range(28) if is_full_step(s, RASConfig())]
    assert full == [0, 1, 2, 3, 12, 20]  # the paper: 4 warm-up steps, error resets at 12 and 20 of 28


# ----------------------------------------------------------------------------- BAC


def test_bac_scheduler_puts_updates_where_the_features_change():
    from backends.accel.bac import schedule_updates

    # two plateaus: steps 0-4 alike, steps 5-9 alike, little similarity across
    sim = np.full((10, 10), 0.1)
    sim[:5, :5] = sim[5:, 5:] = 0.99
    assert schedule_updates(sim, 2) == [0, 5]
    assert schedule_updates(sim, 10) == list(range(10))


def test_bac_bubbling_union_updates_volatile_upstream_ffns_with_downstream_ones():
    from backends.accel.bac import bubbling_union

    updates = [{0, 4}, {0, 2}, {0, 6}, {0, 8}]  # attn, ffn, attn, ffn
    ffn = [False, True, False, True]
    out = bubbling_union(updates, ffn, volatilities=[0.0, 5.0, 0.0, 1.0], top_k=1)
    assert out == [{0, 4}, {0, 2, 8}, {0, 6}, {0, 8}]
    assert bubbling_union(updates, ffn, [0.0, 5.0, 0.0, 1.0], top_k=0) == updates


def check_bac(backend, params=None):
    base, result = run_and_restore(backend, [("bac", params or {})])
    stats = result.method_stats["bac"]
    assert stats["unit_reused"] > 0 and stats["evals_partial"] > 0 and stats["ideal_speedup"] is not None, stats
    assert stats["unit_evals"] < stats["unit_evals"] + stats["unit_reused"]
    assert not same(base, result), "bac did not change the output"
    return stats


def test_bac_on_flux_reuses_sub_blocks_and_restores_the_baseline(flux):
    stats = check_bac(flux)
    assert stats["units"] == len(flux.denoiser.transformer_blocks) * 3 + len(flux.denoiser.single_transformer_blocks) * 2
    again = flux.run(request(flux, [("bac", {})]))
    assert again.method_stats["bac"]["calibrated_this_run"] is False  # the calibration is kept


def test_bac_on_wan_reuses_sub_blocks_and_restores_the_baseline(wan):
    check_bac(wan)


def test_bac_on_the_unet_reuses_its_transformer_sub_blocks():
    sd = ImageBackend("dummy-sd", dummy_sd_pipeline(), torch.device("cpu"), torch.float32)
    check_bac(sd)


def test_bac_updating_every_step_is_exact(flux):
    base = flux.run(request(flux))
    result = flux.run(request(flux, [("bac", {"update_ratio": 1.0})]))
    assert result.method_stats["bac"]["unit_reused"] == 0
    assert same(base, result)


def test_bac_uses_a_stored_calibration_instead_of_measuring(flux):
    from backends.accel.bac import BACMethod

    BACMethod.calibrated.clear()
    first = flux.run(request(flux, [("bac", {})], steps=5))
    record = first.method_stats["bac"]["calibration"]  # measured in this run, for the studio to keep
    BACMethod.calibrated.clear()
    choice = MethodChoice("bac", {}, calibrations=[dict(record, id=7)])
    result = flux.run(request(flux, steps=5).replace(methods=[choice]))
    stats = result.method_stats["bac"]
    assert stats["calibrated_this_run"] is False and stats["calibration_id"] == 7
    assert same(first, result)


def test_bac_calibration_is_stored_by_the_studio_and_reused_after_a_restart(studio_factory, tmp_path, monkeypatch):
    from backends.accel.bac import BACMethod

    monkeypatch.setattr(BACMethod, "calibrated", {})
    run = Request("image", "dummy-flux", "a red circle", seed=3, params={"steps": 6, "guidance": 4.0},
                  methods=[{"name": "bac", "params": {}}])
    studio = studio_factory(data_dir=tmp_path / "d")
    first = studio.generate(run).result
    stats = first.method_stats["bac"]
    assert stats["calibrated_this_run"] and "calibration" not in stats  # the similarities went to the store
    [record] = studio.history.calibrations("dummy-flux", "bac")
    assert record["id"] == stats["calibration_saved"] and len(record["similarity"][0]) == 6
    studio.close()
    monkeypatch.setattr(BACMethod, "calibrated", {})  # a new process: nothing in memory
    again = studio_factory(data_dir=tmp_path / "d").generate(run).result
    assert not again.method_stats["bac"]["calibrated_this_run"]
    assert again.method_stats["bac"]["calibration_id"] == stats["calibration_saved"]
    assert same(first, again)


def test_ras_attach_failing_after_its_model_hooks_leaves_the_model_unpatched(flux, monkeypatch):
    import backends.accel.ras as ras
    from backends.accel.sta import self_attention_modules

    denoiser = flux.denoiser
    processors = [m.processor for m in self_attention_modules(denoiser)]
    hooks = (len(denoiser._forward_pre_hooks), len(denoiser._forward_hooks))

    def broken(self, run):
        raise RuntimeError("block hooks could not be made")

    monkeypatch.setattr(ras.adapter_for(denoiser).__class__, "hooks", broken)
    with pytest.raises(RuntimeError):
        flux.run(request(flux, [("ras", {})]))
    assert (len(denoiser._forward_pre_hooks), len(denoiser._forward_hooks)) == hooks
    assert [m.processor for m in self_attention_modules(denoiser)] == processors
