"""Image-to-image: an init image, noised to an intermediate step and denoised from there.

``strength`` in (0, 1] says how much of the schedule runs: with ``steps`` steps, the last
``int(steps * strength)`` of them, as in diffusers' img2img pipelines (which the single
img2img run of ``ImageBackend`` calls, through ``AutoPipelineForImage2Image.from_pipe``:
the same modules, no reload). The streaming engine (``backends.stream``) shares the
image checks, the VAE encode and decode and the seeded noise kept here.

The init image is encoded here with the VAE's mode (not a sample), and the pipeline gets
the latents: its random generator then draws exactly the noise text-to-image draws with
the same seed, which is what makes strength 1.0 comparable with text-to-image (see
``tests/test_img2img.py``; for a flow-matching model such as FLUX the two are equal).
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from backends.types import ValidationError

DATA_URL_PREFIX = "data:image/"
DEFAULT_STRENGTH = 0.6


def image_to_data_url(image: Image.Image) -> str:
    """A PNG data URL: how a request carries its init image (JSON, kept in history)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_from_data_url(text: Any, size: tuple[int, int] | None = None) -> Image.Image:
    """The init image of a request; a one-line ValidationError when it is not one.

    Only data URLs are accepted: a server path in a request would let a client read files.
    ``size`` (height, width), when given, is checked from the header before the pixels are
    decoded: a small PNG can declare a huge canvas, which must not be decompressed."""
    if isinstance(text, Image.Image):
        image = text.convert("RGB")
        if size is not None:
            check_size(image, *size)
        return image
    if not isinstance(text, str) or not text.startswith(DATA_URL_PREFIX) or ";base64," not in text:
        raise ValidationError("the init image must be a data:image/...;base64 URL (a PNG or JPEG)")
    try:
        raw = base64.b64decode(text.split(";base64,", 1)[1], validate=True)
        image = Image.open(io.BytesIO(raw))
        if size is not None:
            check_size(image, *size)  # header only: nothing decoded yet
        image.load()
    except Image.DecompressionBombError:
        raise ValidationError("the init image is too large to decode") from None
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError):
        raise ValidationError("the init image could not be read as an image") from None
    return image.convert("RGB")


def check_size(image: Image.Image, height: int, width: int, what: str = "the init image") -> None:
    if image.size != (width, height):
        raise ValidationError(f"{what} is {image.width}x{image.height} but this run makes {width}x{height} images; "
                              f"resize it or set width and height to its size")


def denoising_steps(steps: int, strength: float) -> int:
    """How many of ``steps`` an img2img run at ``strength`` runs (diffusers' rule), or a
    one-line error when that is none."""
    if not 0 < strength <= 1:
        raise ValidationError(f"strength must be above 0 and at most 1, got {strength:g}")
    count = min(int(steps * strength), steps)
    if count < 1:
        raise ValidationError(f"strength {strength:g} with {steps} steps runs no denoising step; "
                              f"raise the strength or the steps")
    return count


def is_flow(pipe: Any) -> bool:
    """A flow-matching model (FLUX, SD3): x_sigma = (1 - sigma) x0 + sigma noise."""
    return hasattr(pipe.scheduler, "sigmas") and not hasattr(pipe.scheduler, "alphas_cumprod")


def vae_shift_scale(pipe: Any) -> tuple[float, float]:
    config = pipe.vae.config
    return float(getattr(config, "shift_factor", None) or 0.0), float(config.scaling_factor)


@torch.no_grad()
def encode_images(pipe: Any, images: list[Image.Image], height: int, width: int) -> torch.Tensor:
    """Scaled VAE latents (B, C, h, w) of ``images``, with the mode of the posterior
    (deterministic: no random draw, so the seed's noise stays text-to-image's)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(images, height=height, width=width)
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    latents = retrieve_latents(vae.encode(pixels), sample_mode="argmax")
    shift, scale = vae_shift_scale(pipe)
    return (latents - shift) * scale


@torch.no_grad()
def decode_latents(pipe: Any, latents: torch.Tensor) -> list[Image.Image]:
    """PIL images of scaled latents (B, C, h, w): what the pipelines' decode step does."""
    shift, scale = vae_shift_scale(pipe)
    pixels = pipe.vae.decode(latents.to(pipe.vae.dtype) / scale + shift, return_dict=False)[0]
    return pipe.image_processor.postprocess(pixels, output_type="pil")


def seeded_noise(shape: tuple[int, ...], seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The noise a pipeline draws first from ``seeded_generator(seed)`` for latents of ``shape``."""
    from diffusers.utils.torch_utils import randn_tensor

    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


def img2img_pipeline(pipe: Any) -> Any:
    """diffusers' image-to-image pipeline over the same modules (and the current scheduler,
    so a sampler method attached to the run applies), or a one-line error."""
    from diffusers import AutoPipelineForImage2Image

    try:
        return AutoPipelineForImage2Image.from_pipe(pipe)
    except (ValueError, KeyError, TypeError):
        raise ValidationError(f"this model ({type(pipe).__name__}) has no image-to-image pipeline in diffusers") from None
