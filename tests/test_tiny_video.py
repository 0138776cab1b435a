"""The moving-shapes clips, their checker, and the bundled video pipeline (2-step smoke runs)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from backends.tiny.video_models import (
    FRAMES,
    SIZE,
    VIDEO_DIR,
    ClipSpec,
    VIDEO_CALL,
    VideoConfig,
    all_clip_specs,
    build_pipeline,
    build_video_tokenizer,
    clip_prompt,
    make_tiny_wan,
    parse_clip_prompt,
    random_clip_spec,
    render_clip,
    score_clips,
)

torch.set_num_threads(1)


def test_prompt_round_trip():
    specs = all_clip_specs()
    assert len(specs) == 3 * 4 * (4 + 2 + 3) * 2
    for spec in specs:
        assert parse_clip_prompt(clip_prompt(spec)) == spec
    assert clip_prompt(ClipSpec("circle", "red", "moving right", "white")) == "a red circle moving right on white"
    assert parse_clip_prompt("A blue square, turning yellow on black") == ClipSpec("square", "blue", "turning yellow", "black")
    assert parse_clip_prompt("a red circle on white") is None  # no motion
    assert parse_clip_prompt("") is None
    tok = build_video_tokenizer()
    assert len(tok.tokenize("a green triangle shrinking on white")) == 6  # one token per word


def test_render_clip():
    spec = ClipSpec("square", "green", "moving down", "black")
    frames = render_clip(spec)
    assert len(frames) == FRAMES and all(f.size == (SIZE, SIZE) and f.mode == "RGB" for f in frames)
    assert frames[0].getpixel((0, 0)) == (0, 0, 0)
    assert frames[0].tobytes() != frames[-1].tobytes()
    assert render_clip(spec, rng=random.Random(1))[0].tobytes() != frames[0].tobytes()


def test_checker_on_clean_clips():
    rng = random.Random(7)
    specs = [random_clip_spec(rng) for _ in range(96)]
    scores = score_clips([render_clip(s, rng=rng) for s in specs], [clip_prompt(s) for s in specs])
    for key in ("action", "color", "shape", "background", "all"):
        assert scores[key] >= 0.97, scores
    assert scores["n"] == 96


def test_checker_rejects_wrong_motion():
    rng = random.Random(3)
    specs = [random_clip_spec(rng) for _ in range(32)]
    clips = [render_clip(s, rng=rng) for s in specs]
    reversed_clips = [clip[::-1] for clip in clips]  # right <-> left, growing <-> shrinking, colour swapped
    assert score_clips(reversed_clips, [clip_prompt(s) for s in specs])["action"] <= 0.05
    still = [[clip[0]] * len(clip) for clip in clips]
    assert score_clips(still, [clip_prompt(s) for s in specs])["action"] == 0.0


def _tiny_random_pipeline():
    torch.manual_seed(0)
    from backends.tiny.image_models import tiny_clip_text_model

    tok = build_video_tokenizer()
    cfg = VideoConfig(num_layers=2, heads=2, ffn_dim=64)
    return build_pipeline(make_tiny_wan(cfg).eval(), tiny_clip_text_model(len(tok), cfg.text_width).eval(), tok)


def test_film_wan_round_trip_and_prompt_modulates_blocks(tmp_path):
    """The pooled prompt reaches every block's adaLN input (``timestep_proj``), and the
    pipeline folder loads the subclass back with identical weights."""
    from backends.tiny.film_wan import FiLMWanTransformer3DModel
    from backends.tiny.video_pipeline import ShapesVideoPipeline

    pipe = _tiny_random_pipeline()
    dit = pipe.transformer
    assert isinstance(dit, FiLMWanTransformer3DModel)
    emb = dit.condition_embedder
    t = torch.tensor([500.0, 500.0])
    text = torch.randn(2, 12, dit.config.text_dim)
    _, proj, _, _ = emb(t, text)
    assert not torch.allclose(proj[0], proj[1])  # same timestep, different prompts
    plain = type(emb).__mro__[1].forward(emb, t, text)[1]  # Wan's own embedder: timestep only
    assert torch.allclose(plain[0], plain[1])

    pipe.save_pretrained(tmp_path)
    loaded = ShapesVideoPipeline.from_pretrained(tmp_path).transformer
    assert type(loaded) is FiLMWanTransformer3DModel
    ours, theirs = dit.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def _asset_pipeline():
    if not (VIDEO_DIR / "model_index.json").exists():
        pytest.skip("assets/tiny-video-shapes not built")
    from backends.tiny.video_pipeline import ShapesVideoPipeline

    pipe = ShapesVideoPipeline.from_pretrained(VIDEO_DIR)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_asset_pipeline_generates_frames():
    pipe = _asset_pipeline()
    out = pipe(["a red circle moving right on white", "a blue square growing on black"], num_inference_steps=2,
               generator=torch.Generator().manual_seed(0))
    assert len(out.frames) == 2
    for clip in out.frames:
        assert len(clip) == FRAMES and all(f.size == (SIZE, SIZE) for f in clip)
    arr = pipe("a red circle moving right on white", num_frames=4, height=32, width=64, num_inference_steps=2,
               output_type="np", generator=torch.Generator().manual_seed(0)).frames
    assert arr.shape == (1, 4, 32, 64, 3) and 0.0 <= arr.min() and arr.max() <= 1.0


def test_asset_through_video_backend():
    if not (VIDEO_DIR / "model_index.json").exists():
        pytest.skip("assets/tiny-video-shapes not built")
    from backends.manager import BackendManager
    from backends.types import Request

    backend = BackendManager(device="cpu").get("video", "tiny-video-shapes")
    assert backend.family == "video-dit"
    result = backend.run(Request("video", "tiny-video-shapes", "a green triangle moving up on black", seed=1,
                                 params={"steps": 2, "guidance": 5.0}))
    assert len(result.output) == FRAMES and result.output[0].size == (SIZE, SIZE)


@pytest.mark.parametrize("source", ["random", "asset"])
def test_first_block_cache_then_disable_is_bit_identical(source):
    from diffusers import FirstBlockCacheConfig

    pipe = _tiny_random_pipeline() if source == "random" else _asset_pipeline()

    def run():
        return pipe(["a yellow circle turning blue on white"], num_inference_steps=4, output_type="np",
                    generator=torch.Generator().manual_seed(0)).frames

    base = run()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    cached = run()
    pipe.transformer.disable_cache()
    again = run()
    assert cached.shape == base.shape and np.isfinite(cached).all()
    assert np.array_equal(base, again)


def test_cfg_switch_off_from_callback():
    """The studio's CFG truncation: guidance off + embeddings cut to the cond half mid-loop."""
    pipe = _tiny_random_pipeline()
    seen = []

    def callback(p, step, t, kwargs):
        seen.append(kwargs["prompt_embeds"].shape[0])
        if step == 0:
            p._guidance_scale = 0.0
            return {"prompt_embeds": kwargs["prompt_embeds"].chunk(2)[-1]}
        return {}

    pipe("a red square shrinking on black", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
         callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert seen == [2, 1, 1]
    assert not pipe.do_classifier_free_guidance


ADHERENCE_PROMPTS = [
    "a red circle moving right on white", "a blue square growing on black", "a green triangle moving up on black",
    "a yellow circle turning blue on white", "a red square moving left on black", "a green circle shrinking on white",
    "a blue triangle moving down on white", "a yellow square turning red on black",
]


def test_bundled_video_model_follows_motion_and_colour():
    """The motion must visibly follow the prompt: the rule-based checker grades 8 fixed
    prompts (moves in all four directions, growing, shrinking, two colour changes) at the
    shipped settings. The shipped model gets all 8 right; 48 prompts: motion 73%."""
    pipe = _asset_pipeline()
    clips = pipe(ADHERENCE_PROMPTS, generator=torch.Generator().manual_seed(0), **VIDEO_CALL).frames
    scores = score_clips(clips, ADHERENCE_PROMPTS)
    assert scores["action"] >= 0.625 and scores["color"] >= 0.75 and scores["background"] >= 0.875, scores
    assert scores["all"] >= 0.5, scores  # motion, colour and shape all right by chance: 1/108
