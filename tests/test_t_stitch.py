"""T-Stitch: a smaller sibling runs the early steps (tiny random SD pipelines, no assets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from backends.accel.t_stitch import TStitchMethod, small_step_count, stitch_mismatch  # noqa: E402
from backends.image import ImageBackend  # noqa: E402
from backends.tiny.dummy import dummy_sd_pipeline, dummy_sd_sibling  # noqa: E402
from backends.types import MethodChoice, Request, ValidationError  # noqa: E402

STEPS = 5
SMALL = "tiny-sd-shapes-small"  # a bundled name the method's parameter accepts; the pipeline is pre-seeded


@pytest.fixture(scope="module")
def sd():
    pipe = dummy_sd_pipeline()
    backend = ImageBackend("dummy-sd", pipe, torch.device("cpu"), torch.float32)
    backend.sibling_id = SMALL
    backend.siblings[SMALL] = dummy_sd_sibling(pipe)
    return backend


def request(methods=()):
    return Request("image", "dummy-sd", "a red circle", seed=3, params={"steps": STEPS, "guidance": 4.0},
                   methods=[MethodChoice(name, dict(params)) for name, params in methods])


def pixels(result) -> np.ndarray:
    return np.asarray(result.output)


def test_early_steps_run_on_the_sibling_and_removal_restores_the_baseline(sd):
    calls = {"small": 0}
    hook = sd.siblings[SMALL].unet.register_forward_pre_hook(lambda *_: calls.__setitem__("small", calls["small"] + 1))
    try:
        base = sd.run(request())
        assert calls["small"] == 0
        stitched = sd.run(request([("t_stitch", {"fraction": 0.4})]))
        again = sd.run(request())
    finally:
        hook.remove()
    stats = stitched.method_stats["t_stitch"]
    # 40% of 5 steps = 2 steps on the small UNet (one batched CFG call each), 3 on the full one
    assert (stats["switch_step"], stats["small_calls"], stats["full_calls"]) == (2, 2, 3)
    assert calls["small"] == 2
    assert stats["evals_partial"] == 2 and stats["evals_full"] == 3
    assert not np.array_equal(pixels(base), pixels(stitched))
    assert np.array_equal(pixels(base), pixels(again)), "baseline changed after attach + remove"
    assert "forward" not in vars(sd.pipe.unet)


def test_fraction_zero_is_the_baseline_exactly(sd):
    base = sd.run(request())
    result = sd.run(request([("t_stitch", {"fraction": 0.0})]))
    assert np.array_equal(pixels(base), pixels(result))
    assert result.method_stats["t_stitch"]["small_calls"] == 0
    assert any("no speed-up" in note for note in result.notes)


def test_switch_step_rounds_the_fraction_of_the_steps():
    assert [small_step_count(f, 25) for f in (0.0, 0.4, 0.5, 1.0)] == [0, 10, 12, 25]


def test_a_model_without_a_sibling_is_refused_in_one_line():
    backend = ImageBackend("dummy-sd", dummy_sd_pipeline(), torch.device("cpu"), torch.float32)
    with pytest.raises(ValidationError, match="^model 'dummy-sd' has no smaller sibling for T-Stitch;[^\n]*$"):
        backend.run(request([("t_stitch", {})]))


def test_an_incompatible_sibling_is_refused_in_one_line():
    pipe = dummy_sd_pipeline()
    other_text = dummy_sd_pipeline(seed=5)  # same shapes, other text encoder weights
    sibling = dummy_sd_sibling(pipe)
    assert stitch_mismatch(pipe, sibling) is None
    sibling.text_encoder = other_text.text_encoder
    assert stitch_mismatch(pipe, sibling) == "its text encoder differs (another prompt encoding)"
    assert stitch_mismatch(pipe, dummy_sd_sibling(other_text)).startswith("its VAE differs")
    assert stitch_mismatch(pipe, pipe) == "it is not smaller than the model"
    backend = ImageBackend("dummy-sd", pipe, torch.device("cpu"), torch.float32)
    backend.siblings[SMALL] = sibling
    with pytest.raises(ValidationError, match="^T-Stitch cannot run 'tiny-sd-shapes-small' for the early steps of "
                                              "'dummy-sd': its text encoder differs"):
        backend.run(request([("t_stitch", {"small_model": SMALL})]))
    assert "forward" not in vars(pipe.unet)


def test_the_bundled_model_names_its_sibling():
    from backends.catalog import find_bundled

    assert find_bundled("tiny-sd-shapes").sibling == SMALL
    assert find_bundled(SMALL).modality == "image"
    assert TStitchMethod.spec.defaults() == {"small_model": "auto", "fraction": 0.4}


def test_the_small_recipe_is_the_same_unet_at_half_width():
    from backends.tiny.image_models import UNetConfig, _apply_size, _sample_timesteps, make_tiny_unet

    full, small = UNetConfig(), UNetConfig()
    _apply_size(small, "small")
    assert small.block_out_channels == (16, 32, 64) and small.cross_attention_dim == full.cross_attention_dim
    full_params = sum(p.numel() for p in make_tiny_unet(full).parameters())
    small_params = sum(p.numel() for p in make_tiny_unet(small).parameters())
    assert small_params * 3 < full_params
    torch.manual_seed(0)
    t = _sample_timesteps(small, 4000)
    assert 0.75 < (t >= small.high_noise_t).float().mean() < 0.9  # 3/4 drawn high, plus the uniform share's
    assert t.min() >= 0 and t.max() <= 999


def test_the_bundled_sibling_can_stand_in_for_the_early_steps():
    from backends.tiny.image_models import SD_DIR, SD_SMALL_DIR

    if not (SD_DIR.exists() and SD_SMALL_DIR.exists()):
        pytest.skip("bundled tiny-sd-shapes assets not built")
    from diffusers import DiffusionPipeline

    full, small = DiffusionPipeline.from_pretrained(SD_DIR), DiffusionPipeline.from_pretrained(SD_SMALL_DIR)
    assert stitch_mismatch(full, small) is None  # same VAE, text encoder, tokenizer, schedule; smaller UNet


def test_the_check_is_not_skipped_for_a_new_model_that_reuses_object_ids(monkeypatch):
    """Object ids are reused once an object is freed: a model loaded after another one must
    still have its sibling checked (simulated here: every id equal)."""
    import backends.accel.t_stitch as t_stitch

    monkeypatch.setattr(t_stitch, "id", lambda obj: 0, raising=False)
    first = dummy_sd_pipeline()
    backend = ImageBackend("dummy-sd", first, torch.device("cpu"), torch.float32)
    backend.siblings[SMALL] = dummy_sd_sibling(first)
    backend.run(request([("t_stitch", {"small_model": SMALL})]))  # checked, fits
    pipe = dummy_sd_pipeline()
    later = ImageBackend("dummy-sd", pipe, torch.device("cpu"), torch.float32)
    later.siblings[SMALL] = dummy_sd_sibling(dummy_sd_pipeline(seed=5))  # another VAE
    with pytest.raises(ValidationError, match="its VAE differs"):
        later.run(request([("t_stitch", {"small_model": SMALL})]))


def test_img2img_is_refused_in_one_line(sd):
    from backends.img2img import image_to_data_url
    from PIL import Image

    init = image_to_data_url(Image.new("RGB", (sd.default_size()[1], sd.default_size()[0]), (200, 30, 30)))
    req = request([("t_stitch", {})])
    req = req.replace(params={**req.params, "init_image": init, "strength": 0.6})
    with pytest.raises(ValidationError) as err:
        sd.run(req)
    assert "img2img" in str(err.value) and "\n" not in str(err.value)
    assert "forward" not in vars(sd.pipe.unet)


def test_memory_counts_the_whole_sibling_it_keeps():
    """A sibling loaded from disk holds its own VAE and text encoder (equal to the model's,
    not the same objects): the memory figure counts them."""
    import copy

    from backends.base import module_bytes

    pipe = dummy_sd_pipeline()
    sibling = dummy_sd_sibling(pipe)
    sibling.vae, sibling.text_encoder = copy.deepcopy(pipe.vae), copy.deepcopy(pipe.text_encoder)
    backend = ImageBackend("dummy-sd", pipe, torch.device("cpu"), torch.float32)
    backend.siblings[SMALL] = sibling
    expected = module_bytes(*(getattr(p, n, None) for p in (pipe, sibling) for n in p.components))
    assert backend.memory_bytes() == expected > module_bytes(pipe.unet, pipe.vae, pipe.text_encoder, sibling.unet)
