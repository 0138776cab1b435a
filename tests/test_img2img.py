"""img2img in the image backend: what strength 1.0 equals, that strength cuts the steps,
that an img2img run leaves text-to-image untouched, and one-line errors for bad input."""

import numpy as np
import pytest
import torch

from backends.image import ImageBackend
from backends.img2img import encode_images, image_to_data_url, seeded_noise
from backends.tiny.dummy import dummy_flux_pipeline, dummy_sd_pipeline
from backends.types import MethodChoice, Request, ValidationError
from studio.validation import validate_request

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def sd():
    return ImageBackend("dummy-sd", dummy_sd_pipeline(), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def flux():
    return ImageBackend("dummy-flux", dummy_flux_pipeline(), torch.device("cpu"), torch.float32)


def init_image(size: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def run(backend, seed=3, **params):
    params = {"steps": 6, "guidance": 3.0, **params}
    return backend.run(Request("image", backend.model_id, PROMPT, seed=seed, params=params))


def pixels(result) -> np.ndarray:
    return np.asarray(result.output).astype(np.int16)


def test_flux_img2img_at_strength_one_is_text_to_image(flux):
    """Flow matching starts at sigma = 1: the noised init image is the noise itself, and the
    init image is encoded without a random draw, so the seed's noise is text-to-image's."""
    size = flux.default_size()[0]
    text = run(flux)
    image = run(flux, init_image=image_to_data_url(init_image(size)), strength=1.0)
    assert np.array_equal(pixels(text), pixels(image))
    assert image.model_evals == text.model_evals


def test_sd_img2img_at_strength_one_is_text_to_image_from_the_noised_init_latent(sd):
    """A VP model's first timestep keeps some signal (alpha_bar > 0): img2img at strength 1
    is text-to-image started from sqrt(a) z + sqrt(1 - a) noise, with the seed's noise."""
    size = sd.default_size()[0]
    picture = init_image(size)
    image = run(sd, init_image=image_to_data_url(picture), strength=1.0)
    pipe = sd.pipe
    pipe.scheduler.set_timesteps(6)
    first = pipe.scheduler.timesteps[:1]
    clean = encode_images(pipe, [picture], size, size)
    start = pipe.scheduler.add_noise(clean, seeded_noise(tuple(clean.shape), 3, torch.device("cpu"), torch.float32), first)
    expected = pipe(PROMPT, num_inference_steps=6, guidance_scale=3.0, latents=start, output_type="pil",
                    generator=torch.Generator().manual_seed(3)).images[0]
    assert np.array_equal(pixels(image), np.asarray(expected).astype(np.int16))
    assert not np.array_equal(pixels(image), pixels(run(sd)))  # a (small) signal of the init image is left


def test_strength_runs_that_share_of_the_steps_and_keeps_the_init_image(sd):
    size = sd.default_size()[0]
    picture = init_image(size)
    half = run(sd, init_image=image_to_data_url(picture), strength=0.5)
    full = run(sd, init_image=image_to_data_url(picture), strength=1.0)
    assert half.model_evals == 3 and full.model_evals == 6  # batched CFG: one call per step
    assert half.extra["img2img_steps"] == 3
    other = run(sd, init_image=image_to_data_url(init_image(size, seed=1)), strength=0.5)
    assert not np.array_equal(pixels(half), pixels(other))  # the init image is what it starts from


def test_an_img2img_run_leaves_text_to_image_bit_identical(sd, flux):
    for backend in (sd, flux):
        before = pixels(run(backend))
        run(backend, init_image=image_to_data_url(init_image(backend.default_size()[0])), strength=0.4)
        assert np.array_equal(before, pixels(run(backend)))


@pytest.mark.parametrize("params, expected", [
    ({"strength": 0.5}, "give an init image"),
    ({"init_image": "SIZE:48", "strength": 0.5}, "is 48x48 but this run makes"),
    ({"init_image": "SIZE", "strength": 0.1}, "runs no denoising step"),
    ({"init_image": "data:image/png;base64,bm90IGFuIGltYWdl", "strength": 0.5}, "could not be read"),
    ({"init_image": "/etc/passwd", "strength": 0.5}, "must be a data:image"),
])
def test_bad_img2img_input_is_one_line(sd, params, expected):
    size = sd.default_size()[0]
    if str(params.get("init_image", "")).startswith("SIZE"):
        side = int(params["init_image"].split(":")[1]) if ":" in params["init_image"] else size
        params = {**params, "init_image": image_to_data_url(init_image(side))}
    with pytest.raises(ValidationError) as err:
        run(sd, **params)
    message = str(err.value)
    assert expected in message and "\n" not in message and "Traceback" not in message


def test_an_absurd_strength_is_refused_before_any_model_loads():
    for strength in (5, -1, "lots"):
        with pytest.raises(ValidationError) as err:
            validate_request({"modality": "image", "model": "x", "prompt": "p", "params": {"strength": strength}})
        assert "strength" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["bottleneck_sampling", "ralu", "bac", "approx_cache"])
def test_methods_that_assume_the_whole_schedule_refuse_img2img_in_one_line(flux, name):
    """Their stages, update steps or stored latents count the schedule from noise; img2img
    runs only its tail (found by review: bottleneck_sampling left the image noisy, approx_cache
    crashed), so they refuse it before any work."""
    request = Request("image", flux.model_id, PROMPT, seed=3,
                      params={"steps": 6, "guidance": 3.0, "strength": 0.5,
                              "init_image": image_to_data_url(init_image(flux.default_size()[0]))},
                      methods=[MethodChoice(name, {})])
    with pytest.raises(ValidationError) as err:
        flux.run(request)
    assert "\n" not in str(err.value) and "img2img" in str(err.value)


def blank_png_data_url(side: int) -> str:
    """A 1-bit blank PNG of ``side`` x ``side`` built row by row: a few kB on the wire
    however large the canvas it declares (nothing of that size is ever held here)."""
    import base64
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    packer, row = zlib.compressobj(9), b"\x00" * (1 + (side + 7) // 8)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
           + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def test_a_decompression_bomb_is_a_one_line_refusal(sd):
    url = blank_png_data_url(14000)
    assert len(url) < 200_000
    with pytest.raises(ValidationError) as err:
        run(sd, init_image=url, strength=0.5)
    assert "too large" in str(err.value) and "\n" not in str(err.value)


def test_the_init_image_size_is_checked_before_its_pixels_are_decoded(sd, monkeypatch):
    from PIL import ImageFile

    def no_decoding(self):
        raise AssertionError("the pixels were decoded before the size was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ValidationError) as err:
        run(sd, init_image=blank_png_data_url(2000), strength=0.5)
    assert "is 2000x2000 but this run makes" in str(err.value)
