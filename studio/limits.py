"""What a request may cost before it runs, and giving memory back after one failed.

The cost of a request is estimated from its parameters alone, before any model is
loaded, in one unit for every modality so that one flag (``--max-cost``) bounds them all:

- image / video diffusion: ``width x height x frames x steps / 1e6`` (megapixel-steps; one
  denoising step over a one-megapixel frame is one unit);
- audio diffusion: ``seconds x steps / 10``;
- text: ``(prompt tokens + new tokens) / 100``.

The default limit (500) admits every default request, the bundled models at their usual
sizes and, e.g., a 1024x1024 image at 150 steps (157 units) or a 480x832x49-frame video at
20 steps (391), and refuses a 2048x2048 image at 150 steps (629) or the largest video the
validator allows (1280x1280x257 frames x 150 steps: 63,160, which asked for one 10 GB tensor).
Sizes a request leaves to the model are taken at the bundled model's size, or at a
typical hub model's size for any other model, so leaving them out never dodges the limit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import os
import sys

from backends.params import default
from backends.types import Request, ValidationError

DEFAULT_MAX_COST = 500.0
DEFAULT_TIME_LIMIT_S = 600.0
DEFAULT_STEPS = default("image", "steps")  # what the diffusion backends use when a request gives none
DEFAULT_NEW_TOKENS = default("text", "max_new_tokens")
CHARS_PER_TOKEN = 3  # a conservative guess: tokenizers average 3-4 characters per token

# (height, width, frames, seconds) assumed when a request leaves the size to the model
BUNDLED_SIZES = {"image": (64, 64, 1, 0.0), "video": (64, 64, 16, 0.0), "audio": (0, 0, 1, 4.0)}
HUB_SIZES = {"image": (1024, 1024, 1, 0.0), "video": (480, 832, 49, 0.0), "audio": (0, 0, 1, 10.0)}


def _assumed_size(request: Request) -> tuple[int, int, int, float]:
    from backends.catalog import find_bundled

    entry = find_bundled(request.model)
    # the test-only dummy models are registered names, never a hub id (owner/name) or a
    # folder: anything else that merely starts with "tiny-" or "dummy-" is costed as a hub model
    dummy = request.model.startswith("dummy-") and "/" not in request.model and not os.path.exists(request.model)
    if entry is not None or dummy:
        height, width, frames, seconds = BUNDLED_SIZES[request.modality]
        if entry is not None and entry.default_size:
            height, width = entry.default_size
        return height, width, frames, seconds
    return HUB_SIZES[request.modality]


def _steps(request: Request) -> int:
    """The request's steps, or a method's own step count where one sets it (the sampler)."""
    steps = int(request.params.get("steps") or DEFAULT_STEPS)
    for method in request.methods:
        method_steps = method.params.get("steps")
        if isinstance(method_steps, (int, float)) and method_steps > 0:
            steps = int(method_steps)
    return steps


def estimate_cost(request: Request) -> float:
    """The request's cost in units (see the module docstring); a validated request."""
    params = request.params
    if request.modality == "text":
        prompt_chars = len(request.prompt) + len(params.get("system_prompt") or "")  # both are prefilled
        prompt_tokens = math.ceil(prompt_chars / CHARS_PER_TOKEN)
        new_tokens = int(params.get("max_new_tokens") or DEFAULT_NEW_TOKENS)
        return (prompt_tokens + new_tokens) / 100
    height, width, frames, seconds = _assumed_size(request)
    if request.modality == "audio":
        return float(params.get("seconds") or seconds) * _steps(request) / 10
    height = int(params.get("height") or height)
    width = int(params.get("width") or width)
    frames = int(params.get("frames") or frames) if request.modality == "video" else 1
    return height * width * frames * _steps(request) / 1e6


COST_FORMULAS = {
    "image": "width x height x steps / 1e6",
    "video": "width x height x frames x steps / 1e6",
    "audio": "seconds x steps / 10",
    "text": "(prompt + system prompt + new tokens) / 100",
}


def check_cost(request: Request, max_cost: float | None) -> float:
    """The request's cost; raises a one-line ValidationError naming ``--max-cost`` when it
    is over ``max_cost`` (None or <= 0: no limit)."""
    cost = estimate_cost(request)
    if max_cost is not None and max_cost > 0 and cost > max_cost:
        raise ValidationError(
            f"this request would cost about {cost:,.0f} units ({COST_FORMULAS[request.modality]}), over the "
            f"limit of {max_cost:,.0f} set by --max-cost: lower the size, frames or steps, or start the studio "
            "with a higher --max-cost"
        )
    return cost


def release_memory(manager) -> None:
    """After an out-of-memory failure: collect garbage, empty the device cache, and hand
    freed heap pages back to the operating system (glibc keeps them otherwise, so the
    process would look as big as at its peak)."""
    manager.free_caches()
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to trim
            pass
