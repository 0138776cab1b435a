"""The shapes world, its checker, and the two bundled pipelines (2-step smoke runs)."""

from __future__ import annotations

import random

import pytest
import torch

from backends.tiny.shapes import (
    CLASSIFIER_DIR,
    ShapeSpec,
    all_specs,
    parse_prompt,
    prompt_for,
    random_spec,
    render,
    score_images,
)
from backends.tiny.image_models import FLUX_DIR, SD_DIR

torch.set_num_threads(1)


def test_prompt_round_trip():
    specs = all_specs()
    assert len(specs) == 96
    for spec in specs:
        assert parse_prompt(prompt_for(spec)) == spec
    assert prompt_for(ShapeSpec("circle", "red", "top left", "white")) == "a red circle at top left on white"
    assert parse_prompt("A Blue square, at bottom right on black please") == ShapeSpec(
        "square", "blue", "bottom right", "black"
    )
    assert parse_prompt("a red circle") is None
    assert parse_prompt("") is None


def test_render_size_and_jitter():
    spec = ShapeSpec("triangle", "yellow", "bottom left", "black")
    img = render(spec)
    assert img.size == (64, 64) and img.mode == "RGB"
    assert img.getpixel((60, 3)) == (0, 0, 0)  # background far from the shape
    assert render(spec, rng=random.Random(1)).tobytes() != img.tobytes()
    assert render(spec, size=32).size == (32, 32)


def test_classifier_on_clean_renders():
    if not (CLASSIFIER_DIR / "model.safetensors").exists():
        pytest.skip("assets/shapes-classifier not built")
    rng = random.Random(7)
    specs = [random_spec(rng) for _ in range(64)]
    scores = score_images([render(s, rng=rng) for s in specs], [prompt_for(s) for s in specs])
    for key in ("shape", "color", "position", "background", "all"):
        assert scores[key] >= 0.95, scores
    assert scores["n"] == 64


def _load(path):
    if not (path / "model_index.json").exists():
        pytest.skip(f"{path.name} not built")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiny_sd_pipeline_generates():
    pipe = _load(SD_DIR)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    out = pipe("a red circle at top left on white", num_inference_steps=2, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (64, 64)  # default size = unet.sample_size * vae scale


def test_tiny_flux_pipeline_generates():
    pipe = _load(FLUX_DIR)
    assert type(pipe).__name__ == "FluxPipeline"
    assert sum(1 for _ in pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks) >= 6
    out = pipe("a blue square at bottom right on black", num_inference_steps=2, true_cfg_scale=4.0,
               negative_prompt="", height=64, width=64, max_sequence_length=16,
               generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (64, 64)


ADHERENCE_PROMPTS = [prompt_for(ShapeSpec(s, c, p, b)) for s, c, p, b in [
    ("circle", "red", "top left", "white"), ("square", "blue", "bottom right", "black"),
    ("triangle", "green", "top right", "white"), ("circle", "yellow", "bottom left", "black"),
    ("square", "red", "bottom left", "white"), ("triangle", "blue", "top left", "black"),
    ("circle", "green", "bottom right", "black"), ("square", "yellow", "top right", "white"),
]]


@pytest.mark.parametrize("folder", [SD_DIR, FLUX_DIR], ids=["tiny-sd-shapes", "tiny-flux-shapes"])
def test_bundled_image_models_follow_colour_position_and_background(folder):
    """The bundled models must visibly follow their prompts: the shapes classifier grades
    8 fixed prompts at the shipped settings (shape is the hard attribute, right about half
    the time)."""
    pipe = _load(folder)
    if not CLASSIFIER_DIR.exists():
        pytest.skip("assets/shapes-classifier not built")
    kwargs = dict(num_inference_steps=25, generator=torch.Generator().manual_seed(0))
    if folder == FLUX_DIR:
        kwargs.update(true_cfg_scale=4.0, negative_prompt=[""] * 8, height=64, width=64, max_sequence_length=16)
    else:
        kwargs.update(guidance_scale=4.0)
    scores = score_images(pipe(ADHERENCE_PROMPTS, **kwargs).images, ADHERENCE_PROMPTS)
    assert scores["color"] >= 0.75 and scores["position"] >= 0.75 and scores["background"] >= 0.875, scores
    assert scores["all"] >= 0.25, scores  # all four right by chance: 1/96


def test_recipes_noise_with_the_schedulers_own_formulas():
    """The image and audio recipes noise with ``scheduler.add_noise`` and take the
    v-prediction target from ``get_velocity``: the same numbers the shipped models were
    trained with (sqrt(a) x0 + sqrt(1 - a) noise, sqrt(a) noise - sqrt(1 - a) x0)."""
    import torch

    from backends.tiny.image_models import make_ddim_scheduler

    sched = make_ddim_scheduler()
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(sched.add_noise(x0, noise, t), a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-6)
    assert torch.allclose(sched.get_velocity(x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0, atol=1e-6)
