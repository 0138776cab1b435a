"""Codec-LM audio (MusicGen layout): our decoding loop reproduces transformers' generate,
speculative decoding with a draft of the same family is exact, static cache is exact, and
the backend fits the studio (manager, methods, history)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backends.accel._codec_decoding import CodecSession, greedy_loop, speculative_loop
from backends.tiny.dummy_codec import dummy_codec_backend
from backends.types import MethodChoice, Request, ValidationError

PROMPTS = ["a calm piano melody", "fast drums and bass", "x"]


@pytest.fixture(scope="module")
def codec():
    torch.manual_seed(0)
    return dummy_codec_backend()


def request(prompt: str, seconds: float = 0.05, methods=(), **params) -> Request:
    return Request(modality="audio", model="dummy-musicgen", prompt=prompt, seed=0,
                   params={"seconds": seconds, **params}, methods=[MethodChoice(*m) for m in methods])


@pytest.mark.parametrize("prompt", PROMPTS)
def test_own_greedy_loop_matches_transformers_generate(codec, prompt):
    plan = codec.build_plan(request(prompt))
    with torch.inference_mode():
        reference = codec._hf_generate(plan)
        ours = codec.plain_codes(plan)
    assert reference.shape == ours.shape == (1, 1, 4, 25)  # 0.05 s at 500 frames/s
    assert torch.equal(reference, ours)


@pytest.mark.parametrize("gamma", [1, 3, 7])
def test_speculative_loop_is_exact_and_saves_forwards_with_a_good_draft(codec, gamma):
    plan = codec.build_plan(request(PROMPTS[0], seconds=0.08))
    with torch.inference_mode():
        expected = codec.plain_codes(plan)
        # the paired random draft: nothing is accepted, the output must still be exact
        target, draft = codec.session(codec.model, plan), codec.session(codec.drafts["dummy-musicgen-draft"][0], plan)
        columns, stats = speculative_loop(target, draft, gamma)
        assert torch.equal(target.codes(columns), expected)
        assert stats["accepted_positions"] < stats["proposed_positions"]
        # the target as its own draft: every proposal is accepted, ~gamma+1 positions per forward
        target, same = codec.session(codec.model, plan), codec.session(codec.model, plan)
        columns, stats = speculative_loop(target, same, gamma)
    assert torch.equal(target.codes(columns), expected)
    assert stats["accepted_positions"] == stats["proposed_positions"] > 0
    positions = plan.max_new_tokens
    assert target.forwards == pytest.approx(positions / (gamma + 1), abs=1)


def test_delay_pattern_forces_the_staggered_start(codec):
    plan = codec.build_plan(request(PROMPTS[1]))
    with torch.inference_mode():
        session = CodecSession(codec.model, plan.input_ids, plan.attention_mask, 3.0, plan.max_new_tokens + 1)
        columns = greedy_loop(session)
    seq = torch.stack(columns, dim=1)
    for k in range(4):  # codebook k starts k positions late and ends K-1-k early
        assert (seq[k, : k + 1] == session.pad_id).all()
        assert (seq[k, k + 1 : seq.shape[1] - (3 - k)] != session.pad_id).all()


def test_backend_run_speculative_and_static_cache_give_the_baseline_audio(codec):
    base = codec.run(request(PROMPTS[0]))
    audio, rate = base.output
    assert rate == 8000 and audio.dtype == np.float32 and audio.ndim == 1
    assert audio.shape[0] == 25 * 16  # 25 frames x hop 16
    spec = codec.run(request(PROMPTS[0], methods=[("speculative", {"num_assistant_tokens": 4})]))
    assert np.array_equal(spec.output[0], audio)
    stats = spec.method_stats["speculative"]
    assert stats["draft"] == "dummy-musicgen-draft" and stats["target_forwards"] >= 1
    assert spec.extra["output_codes"] == base.extra["output_codes"]
    static = codec.run(request(PROMPTS[0], methods=[("static_cache", {})]))
    assert np.array_equal(static.output[0], audio)
    again = codec.run(request(PROMPTS[0]))  # methods removed: baseline bit-identical
    assert np.array_equal(again.output[0], audio)


def test_speculative_refuses_sampling_and_mismatched_drafts(codec):
    with pytest.raises(ValidationError, match="greedy"):
        codec.run(request(PROMPTS[0], methods=[("speculative", {})], temperature=0.8))
    from backends.tiny.dummy_codec import dummy_musicgen

    odd = dummy_musicgen(layers=1, seed=2)
    odd.decoder.config.num_codebooks = 8
    codec.drafts["odd"] = (odd, None)
    old = codec.draft_id
    codec.draft_id = "odd"
    try:
        with pytest.raises(ValidationError, match="audio codes"):
            codec.run(request(PROMPTS[0], methods=[("speculative", {})]))
    finally:
        codec.draft_id = old
        del codec.drafts["odd"]


def test_the_tuner_tries_a_codec_model_only_with_its_own_paired_draft(codec):
    from backends.accel.speculative import SpeculativeMethod

    assert codec.family == "codec-lm" and codec.draft_id  # the dummy MusicGen has a paired draft
    assert SpeculativeMethod.limits(codec).search_choices["draft"] == ("auto",)


def test_studio_generates_codec_audio_into_history(studio_factory):
    studio = studio_factory()
    result = studio.generate(request(PROMPTS[2], seconds=0.1, methods=[("speculative", {"num_assistant_tokens": 3})]))
    row = studio.history.get(result.run_id)
    assert row.status == "ok" and row.model == "dummy-musicgen"
    assert row.output_path and row.output_path.endswith(".wav")
    from backends.accel.base import methods_for

    names = {m.spec.name for m in methods_for("audio", "codec-lm")}
    assert {"speculative", "static_cache"} <= names and not names & {"deepcache", "sway_sampling", "teacache"}


def test_text_to_speech_model_through_the_studio(studio_factory, tmp_path):
    import soundfile as sf

    studio = studio_factory()
    req = Request(modality="audio", model="dummy-vits", prompt="hello from the studio", seed=3, params={"seconds": 1.0})
    first = studio.generate(req)
    again = studio.generate(req)
    audio, rate = first.result.output
    assert rate == 8000 and audio.ndim == 1 and audio.size > 0
    assert np.array_equal(audio, again.result.output[0])  # same seed, same waveform
    on_disk, disk_rate = sf.read(first.result.output_path, dtype="float32")
    assert disk_rate == 8000 and on_disk.shape == audio.shape
    assert studio.manager.get("audio", "dummy-vits").family == "tts"
    from backends.tts import is_tts_source

    assert is_tts_source("facebook/mms-tts-eng") and not is_tts_source("cvssp/audioldm2")


def test_prompt_lookup_over_codes_is_exact_and_accepts_on_repetitive_audio(codec):
    from backends.accel._codec_decoding import ngram_proposer, verify_loop

    plan = codec.build_plan(request(PROMPTS[1], seconds=0.2))  # 100 frames
    with torch.inference_mode():
        expected = codec.plain_codes(plan)
        for n in (1, 3):
            target = codec.session(codec.model, plan)
            columns, stats = verify_loop(target, ngram_proposer(target, n), 6)
            assert torch.equal(target.codes(columns), expected)
    # even a random tiny codec LM repeats a few columns: the lookup must find and accept some
    assert stats["accepted_positions"] > 0 and target.forwards < plan.max_new_tokens
    result = codec.run(request(PROMPTS[1], seconds=0.2, methods=[("prompt_lookup", {"num_tokens": 6})]))
    assert result.extra["output_codes"] == expected[0, 0].tolist()
    assert result.method_stats["prompt_lookup"]["positions_per_target_forward"] > 1.0


def test_progress_is_reported_per_position(codec):
    seen = []
    codec.run(request(PROMPTS[0]), progress=lambda done, total, stage: seen.append((done, total, stage)))
    plan = codec.build_plan(request(PROMPTS[0]))
    assert seen and seen[-1][0] == seen[-1][1] == plan.max_new_tokens + 1 and seen[-1][2] == "decode"
