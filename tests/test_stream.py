"""The StreamDiffusion engine and the Stream mode: a frame alone equals diffusers' img2img,
stream batch equals sequential within the batched kernels' rounding, RCFG runs one
evaluation per step, the similarity filter skips identical frames, errors are one line,
and a stream is kept in history."""

import numpy as np
import pytest
import torch
from PIL import Image

from backends.image import ImageBackend
from backends.img2img import image_to_data_url
from backends.stream import (
    Schedule, SimilarityFilter, StreamConfig, StreamSession, stream_config, to_clean_and_noise, virtual_negative,
)
from backends.tiny.dummy import dummy_flux_pipeline, dummy_sd_pipeline
from backends.types import Request, StudioError, ValidationError

PROMPT = "a red circle"
STEPS, STRENGTH = 8, 0.5  # 4 denoising steps per frame


@pytest.fixture(scope="module")
def sd():
    return ImageBackend("dummy-sd", dummy_sd_pipeline(), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def flux():
    return ImageBackend("dummy-flux", dummy_flux_pipeline(), torch.device("cpu"), torch.float32)


def frames_for(backend, count=5, seed=0):
    size = backend.default_size()[0]
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def session(backend, guidance=3.0, **options):
    size = backend.default_size()[0]
    config = StreamConfig(**{"similarity_filter": False, **options})
    return StreamSession(backend.pipe, PROMPT, "", seed=5, steps=STEPS, strength=STRENGTH, guidance=guidance,
                         height=size, width=size, config=config)


def as_array(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_a_frame_alone_is_diffusers_img2img_of_it(name, request):
    """Sequential, with the real negative pass every step: the same sampler as the
    pipeline's (DDIM / flow Euler), so each output frame is diffusers' img2img output."""
    backend = request.getfixturevalue(name)
    frames = frames_for(backend, 3)
    stream = session(backend, stream_batch=False, rcfg="none").run(frames)
    for frame, out in zip(frames, stream):
        params = {"steps": STEPS, "guidance": 3.0, "init_image": image_to_data_url(frame), "strength": STRENGTH}
        alone = backend.run(Request("image", backend.model_id, PROMPT, seed=5, params=params)).output
        assert np.abs(as_array(alone) - as_array(out)).max() <= 1  # 8-bit rounding of float32 reorderings


@pytest.mark.parametrize("name", ["sd", "flux"])
def test_stream_batch_matches_sequential_with_one_call_per_frame(name, request):
    backend = request.getfixturevalue(name)
    frames = frames_for(backend, 5)
    steps = 4
    sequential, batched = session(backend, stream_batch=False), session(backend, stream_batch=True)
    one, two = sequential.run(frames), batched.run(frames)
    assert len(one) == len(two) == len(frames)
    for a, b in zip(one, two):
        assert np.abs(as_array(a) - as_array(b)).max() <= 2  # only the batched kernels' rounding differs
    assert sequential.stats.model_calls == len(frames) * steps
    assert batched.stats.model_calls == len(frames) + steps - 1  # fill + one call per frame + drain
    assert sequential.stats.model_evals == batched.stats.model_evals == len(frames) * steps  # RCFG self: 1 per step


def test_rcfg_costs_one_evaluation_per_step_and_still_guides(sd):
    frames = frames_for(sd, 3)
    runs = {mode: session(sd, rcfg=mode) for mode in ("none", "self", "onetime")}
    outputs = {mode: s.run(frames) for mode, s in runs.items()}
    assert runs["none"].stats.model_evals == 2 * 3 * 4
    assert runs["self"].stats.model_evals == 3 * 4
    assert runs["onetime"].stats.model_evals == 3 * 4 + 3  # the negative once per frame
    unguided = session(sd, guidance=1.0).run(frames)
    assert any(not np.array_equal(as_array(a), as_array(b)) for a, b in zip(outputs["self"], unguided))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample", "flow"])
def test_the_virtual_negative_explains_the_latent_as_the_reference_plus_noise(prediction):
    """RCFG's negative output, read back as (x0, eps), is the reference and the residual."""
    gen = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)
    a = torch.tensor([0.3, 0.8])
    b = (1 - a) if prediction == "flow" else (1 - a**2).sqrt()
    s = Schedule(a, b, a, b, torch.tensor([1, 2]), prediction == "flow", prediction)
    idx = torch.tensor([0, 1])
    x = a.view(-1, 1, 1, 1) * clean + b.view(-1, 1, 1, 1) * noise
    x0, eps = to_clean_and_noise(s, idx, x, virtual_negative(s, idx, x, clean, delta=1.0))
    assert torch.allclose(x0, clean, atol=1e-5) and torch.allclose(eps, noise, atol=1e-5)


def test_the_similarity_filter_skips_identical_frames(sd):
    a, b = frames_for(sd, 2)
    stream = session(sd, similarity_filter=True)
    out = stream.run([a, a, a, b, b])
    assert stream.stats.frames_skipped == 3 and stream.stats.frames_processed == 2
    assert len(out) == 5
    assert all(np.array_equal(as_array(out[0]), as_array(o)) for o in out[1:3])
    assert np.array_equal(as_array(out[3]), as_array(out[4])) and not np.array_equal(as_array(out[0]), as_array(out[3]))
    capped = session(sd, similarity_filter=True, max_skip_frames=1)
    capped.run([a, a, a])
    assert capped.stats.frames_skipped == 1  # after one skip in a row, a frame is processed anyway
    off = session(sd, similarity_filter=False)
    off.run([a, a, a])
    assert off.stats.frames_skipped == 0


def test_the_skip_probability_follows_the_similarity():
    filt = SimilarityFilter(StreamConfig(threshold=0.9), seed=0)
    assert filt.skip_probability(0.5) == 0 and filt.skip_probability(1.0) == 1
    assert filt.skip_probability(0.95) == pytest.approx(0.5)


def test_bad_stream_input_is_one_line(sd):
    for options, expected in (({"rcfg": "maybe"}, "must be one of"), ({"threshold": 3}, "between"),
                              ({"speed": 1}, "no parameter")):
        with pytest.raises(ValidationError) as err:
            stream_config(options)
        assert expected in str(err.value) and "\n" not in str(err.value)
    wrong = Image.new("RGB", (7, 7))
    with pytest.raises(ValidationError) as err:
        session(sd).push(wrong)
    assert "frame 1 is 7x7" in str(err.value)


def test_a_stream_is_kept_in_history(studio_factory):
    from studio.streaming import frames_to_gif_bytes, read_frames, run_stream

    studio = studio_factory()
    request = {"modality": "image", "model": "dummy-sd", "prompt": PROMPT, "seed": 1,
               "params": {"steps": 4, "strength": 0.5, "guidance": 2.0}}
    frames = [Image.new("RGB", (40, 40), (i * 40, 0, 0)) for i in range(4)]  # resized to the model's 32x32
    gif = studio.data_dir / "in.gif"
    gif.write_bytes(frames_to_gif_bytes(frames))
    read = read_frames([gif])
    assert len(read) == 4
    outcome = run_stream(studio, request, read, {"similarity_filter": False})
    assert len(outcome.frames) == 4 and outcome.stats.fps > 0
    row = studio.history.get(outcome.run_id)
    assert row.status == "ok" and row.methods[0]["name"] == "streamdiffusion" and row.metrics["fps"] > 0
    assert studio.outputs.resolve(row.output_path).is_file()
    with pytest.raises(ValidationError) as err:
        run_stream(studio, request, [], {})
    assert "no frames" in str(err.value)
    with pytest.raises(StudioError) as err:
        studio.rerun(outcome.run_id)
    assert "is a stream" in str(err.value) and "\n" not in str(err.value)


def test_a_live_stream_returns_frames_after_the_batch_fills_and_restarts_on_new_settings(studio_factory):
    from studio.streaming import LiveStream

    studio = studio_factory()
    request = Request("image", "dummy-sd", PROMPT, seed=1, params={"steps": 4, "strength": 0.5, "guidance": 2.0})
    live = LiveStream(studio, request, {"similarity_filter": False})
    frames = [Image.new("RGB", (32, 32), (i * 50, 10, 10)) for i in range(3)]
    assert live.push(frames[0]) is None  # 2 denoising steps: the first output comes one frame later
    assert live.push(frames[1]) is not None and live.session.stats.frames_in == 2
    assert live.matches(request, {"similarity_filter": False})
    assert not live.matches(request.replace(prompt="a blue square"), {"similarity_filter": False})


def test_a_stream_over_the_cost_limit_is_refused_in_one_line(studio_factory):
    from studio.streaming import run_stream

    studio = studio_factory(max_cost=0.05)  # one 32x32 frame at 4 steps costs 0.004 units
    request = {"modality": "image", "model": "dummy-sd", "prompt": PROMPT, "params": {"steps": 4, "width": 32,
                                                                                      "height": 32}}
    frames = [Image.new("RGB", (32, 32))] * 20
    with pytest.raises(ValidationError) as err:
        run_stream(studio, request, frames, {})
    assert "--max-cost" in str(err.value) and "20 frames" in str(err.value) and "\n" not in str(err.value)
    assert studio.history.count() == 0  # refused: not a run


def test_a_long_clip_is_refused_without_decoding_all_of_it(tmp_path, monkeypatch):
    import imageio.v3 as iio

    from studio.streaming import frames_to_gif_bytes, read_frames

    clip = tmp_path / "long.gif"
    clip.write_bytes(frames_to_gif_bytes([Image.new("RGB", (8, 8), (i * 20, 0, 0)) for i in range(12)]))
    decoded = []
    real_imiter = iio.imiter

    def counting(*args, **kwargs):
        for frame in real_imiter(*args, **kwargs):
            decoded.append(1)
            yield frame

    monkeypatch.setattr(iio, "imiter", counting)
    with pytest.raises(ValidationError) as err:
        read_frames([clip], limit=3)
    assert "at most 3" in str(err.value)
    assert len(decoded) == 4  # stopped at the first frame past the limit


def test_a_live_stream_over_the_cost_limit_is_refused_in_one_line(studio_factory):
    from studio.streaming import LiveStream

    studio = studio_factory(max_cost=0.001)  # one 32x32 frame at 4 steps costs 0.004 units
    request = Request("image", "dummy-sd", PROMPT, seed=1, params={"steps": 4, "width": 32, "height": 32})
    with pytest.raises(ValidationError) as err:
        LiveStream(studio, request, {})
    assert "--max-cost" in str(err.value) and "\n" not in str(err.value)


def test_a_live_frame_stops_at_the_time_limit(studio_factory, monkeypatch):
    import backends.control as control
    from backends.control import RunCancelled
    from studio.streaming import LiveStream

    studio = studio_factory()
    studio.time_limit_s = 5.0
    live = LiveStream(studio, Request("image", "dummy-sd", PROMPT, seed=1, params={"steps": 4}),
                      {"similarity_filter": False})
    from types import SimpleNamespace

    clock = iter([0.0] + [100.0] * 1000)  # the deadline is set at 5 s; the first check is at 100 s
    monkeypatch.setattr(control, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    with pytest.raises(RunCancelled) as err:
        live.push(Image.new("RGB", (32, 32)))
    assert "time limit" in str(err.value)


def test_a_stream_whose_output_cannot_be_saved_is_a_failed_row_and_one_line(studio_factory, monkeypatch):
    from studio.streaming import run_stream

    studio = studio_factory()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device: '/srv/secret/outputs'")

    monkeypatch.setattr(studio.outputs, "save", full_disk)
    request = {"modality": "image", "model": "dummy-sd", "prompt": PROMPT, "params": {"steps": 2}}
    with pytest.raises(StudioError) as err:
        run_stream(studio, request, [Image.new("RGB", (32, 32))], {"similarity_filter": False})
    message = str(err.value)
    assert "OSError" in message and "/srv" not in message and "\n" not in message
    assert studio.history.count() == 1
    assert studio.history.query(limit=1)[0].status == "failed"
