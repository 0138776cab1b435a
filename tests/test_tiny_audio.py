"""The synth-sounds world, its spectrogram/vocoder and checker, the bundled audio pipeline
(2-step smoke runs, methods through AudioBackend) and sway sampling."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from backends.tiny import audio_data as ad

torch.set_num_threads(1)


def test_prompt_round_trip():
    specs = ad.all_specs()
    assert len(specs) == 67 and len(set(specs)) == 67
    for spec in specs:
        assert ad.parse_prompt(ad.prompt_for(spec)) == spec
    assert ad.prompt_for(ad.SoundSpec("tone", pitch="high", timbre="sine")) == "a high sine tone"
    assert ad.parse_prompt("A fast drum pattern, please") == ad.SoundSpec("drums", tempo="fast")
    assert ad.parse_prompt("a minor chord on a saw wave") is None  # no pitch named
    assert ad.parse_prompt("a high tone") is None
    assert ad.parse_prompt("") is None


def test_synth_clip_shape_and_variation():
    spec = ad.SoundSpec("arpeggio", pitch="mid", quality="minor", direction="down", timbre="square")
    clip = ad.synthesize(spec, random.Random(0))
    assert clip.shape == (ad.N_SAMPLES,) and clip.dtype == np.float32
    assert 0.05 < np.abs(clip).max() <= 1.0
    assert not np.array_equal(clip, ad.synthesize(spec, random.Random(1)))
    assert ad.audio_to_spec(clip[None]).shape == (1, 1, ad.N_MELS, ad.N_FRAMES)


def _peak_hz(wave: np.ndarray) -> float:
    mag = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.argmax(mag) * ad.SAMPLE_RATE / len(wave))


@pytest.mark.parametrize("pitch", ["low", "high"])
def test_griffin_lim_keeps_pitch(pitch):
    spec = ad.SoundSpec("tone", pitch=pitch, timbre="sine")
    clip = ad.synthesize(spec, random.Random(3))
    rebuilt = ad.spec_to_audio(ad.audio_to_spec(clip[None]))[0].numpy()
    assert rebuilt.shape == clip.shape
    assert abs(_peak_hz(rebuilt) / _peak_hz(clip) - 1) < 0.03
    assert abs(_peak_hz(rebuilt) / ad.PITCHES[pitch] - 1) < 0.05


def test_classifier_on_clean_synth():
    if not (ad.CLASSIFIER_DIR / "model.safetensors").exists():
        pytest.skip("assets/audio-classifier not built")
    rng = random.Random(7)
    specs = [ad.random_spec(rng) for _ in range(64)]
    waves = np.stack([ad.synthesize(s, rng) for s in specs])
    scores = ad.score_audio(waves, ad.SAMPLE_RATE, [ad.prompt_for(s) for s in specs])
    assert scores["n"] == 64
    for key in ("kind", "pitch", "timbre", "all"):
        assert scores[key] >= 0.95, scores
    # the (waveform, rate) pairs the audio backend returns are accepted as well
    pairs = ad.score_audio([(w, ad.SAMPLE_RATE) for w in waves[:8]], 0, [ad.prompt_for(s) for s in specs[:8]])
    assert pairs["n"] == 8


# ----------------------------------------------------------------------------- bundled pipeline


def _audio_backend():
    from backends.tiny.audio_models import AUDIO_DIR

    if not (AUDIO_DIR / "model_index.json").exists():
        pytest.skip("assets/tiny-audio-synth not built")
    from backends.manager import BackendManager

    return BackendManager(device="cpu").get("audio", "tiny-audio-synth")


def test_asset_pipeline_generates_right_length():
    backend = _audio_backend()
    pipe = backend.pipe
    assert type(pipe).__name__ == "SynthAudioPipeline" and backend.family == "audio-unet"
    assert backend.sample_rate == 16000 and len(pipe.unet.up_blocks) >= 3
    out = pipe(["a high sine tone", "a fast drum pattern"], audio_length_in_s=0.5, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0))
    assert out.audios.shape == (2, 8000) and np.isfinite(out.audios).all()


def test_methods_on_asset_via_backend_and_bit_identical_after_remove():
    from backends.types import MethodChoice, Request

    backend = _audio_backend()
    params = {"steps": 6, "guidance": 3.0, "seconds": 0.5}
    base = Request("audio", "tiny-audio-synth", "a low major chord on a saw wave", seed=1, params=params)
    wave, rate = backend.run(base).output
    assert wave.shape == (8000,) and rate == 16000
    fast = backend.run(Request("audio", "tiny-audio-synth", base.prompt, seed=1, params=params, methods=[
        MethodChoice("deepcache", {"interval": 3}), MethodChoice("cfg_truncation", {"fraction": 0.5})]))
    stats = fast.method_stats
    assert stats["deepcache"]["shallow_steps"] == 4 and stats["cfg_truncation"]["unguided_steps"] == 3
    assert fast.output[0].shape == wave.shape and not np.array_equal(fast.output[0], wave)
    again, _ = backend.run(base).output
    assert np.array_equal(again, wave)


# ----------------------------------------------------------------------------- sway sampling


def test_sway_sigma_schedule():
    from backends.accel.sway_sampling import sway, sway_sigmas

    assert sway(0.0, -1.0) == 0.0 and sway(1.0, -1.0) == pytest.approx(1.0)
    sig = sway_sigmas(4, -1.0)  # s = -1: t' = 1 - cos(pi/2 t), sigma = cos(pi/2 t)
    assert sig == pytest.approx([1.0, np.cos(np.pi / 8), np.cos(np.pi / 4), np.cos(3 * np.pi / 8)])
    assert sway_sigmas(5, 0.0) == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    for s in (-1.0, -0.5, 0.5, 1.0):
        assert np.all(np.diff(sway_sigmas(16, s)) < 0)
    # s < 0: the first step is smaller than uniform (steps crowd near the noise end)
    assert 1 - sway_sigmas(10, -1.0)[1] < 0.1


def _tiny_flow_backend():
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel

    from backends.audio import AudioBackend
    from backends.tiny.audio_models import build_audio_tokenizer
    from backends.tiny.audio_pipeline import SynthAudioPipeline
    from backends.tiny.image_models import tiny_clip_text_model

    torch.manual_seed(0)
    tok = build_audio_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=ad.N_MELS, in_channels=2, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=4,
    )
    pipe = SynthAudioPipeline(unet=unet.eval(), text_encoder=tiny_clip_text_model(len(tok), 16).eval(),
                              tokenizer=tok, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                              griffin_lim_iters=2)
    flow = AudioBackend("tiny-flow-audio", pipe, torch.device("cpu"), torch.float32)
    ddim = AudioBackend("tiny-ddim-audio", SynthAudioPipeline(
        unet=unet, text_encoder=pipe.text_encoder, tokenizer=tok, scheduler=DDIMScheduler(), griffin_lim_iters=2),
        torch.device("cpu"), torch.float32)
    return flow, ddim


def test_sway_sampling_on_flow_model_and_restores_scheduler():
    from backends.accel.sway_sampling import sway_sigmas
    from backends.types import MethodChoice, Request, ValidationError

    flow, ddim = _tiny_flow_backend()
    scheduler = flow.pipe.scheduler
    params = {"steps": 4, "guidance": 2.0, "seconds": 0.25}
    base = Request("audio", "tiny-flow-audio", "a high sine tone", seed=0, params=params)
    ref = flow.run(base).output[0]
    assert np.allclose(scheduler.sigmas.numpy(), [1.0, 0.667, 0.334, 0.001, 0.0], atol=1e-3)

    swayed = flow.run(Request("audio", "tiny-flow-audio", base.prompt, seed=0, params=params,
                              methods=[MethodChoice("sway_sampling", {"coefficient": -1.0})]))
    assert np.allclose(scheduler.sigmas.numpy(), sway_sigmas(4, -1.0) + [0.0], atol=1e-6)
    assert swayed.method_stats["sway_sampling"]["first_sigmas"][1] == pytest.approx(np.cos(np.pi / 8), abs=1e-4)
    assert "set_timesteps" not in vars(scheduler)  # the class method is back
    assert not np.array_equal(swayed.output[0], ref)
    assert np.array_equal(flow.run(base).output[0], ref)

    with pytest.raises(ValidationError, match="flow-matching"):
        ddim.run(Request("audio", "tiny-ddim-audio", base.prompt, params=params, methods=[MethodChoice("sway_sampling")]))


def test_bundled_audio_model_follows_kind_pitch_and_tempo():
    """8 fixed prompts at the shipped settings, graded by the audio classifier."""
    from backends.tiny.audio_data import audio_prompts, score_audio

    pipe = _audio_backend().pipe
    prompts = audio_prompts(8, seed=3)
    out = pipe(prompts, num_inference_steps=25, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    scores = score_audio([(a, 16000) for a in out.audios], 16000, prompts)
    assert scores["kind"] >= 0.75, scores
    for attribute in ("pitch", "tempo"):
        if attribute in scores:
            assert scores[attribute] >= 0.6, scores
