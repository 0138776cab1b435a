"""StreamDiffusion (Kodaira et al., 2023): img2img over a frame sequence, frames out.

Every frame is img2img'd with one prompt and one fixed noise (the seed's), so successive
outputs stay consistent. Three of the paper's ideas are options of ``StreamConfig``:

- **stream batch**: the denoising steps of successive frames share one model call. With
  k denoising steps, the batch holds k frames, each one step further along (frame n at
  step 0, frame n-1 at step 1, ...): one call per input frame instead of k, at the cost of
  k-1 frames of latency. Each frame's arithmetic is the same as alone; only the batched
  kernels' rounding differs (``tests/test_stream.py`` bounds it).
- **residual CFG (RCFG)**: classifier-free guidance without a second, negative pass at
  every step. The negative branch is replaced by the "virtual residual noise" that would
  explain the current latent as a noised copy of a reference clean latent: the input
  frame's own latent (``self``: one evaluation per step), or the negative prompt's clean
  estimate from its one real pass at the first step (``onetime``: one extra evaluation per
  frame). ``none`` runs the usual two passes per step.
- **stochastic similarity filter**: an input frame nearly identical to the last frame
  processed (cosine similarity above ``threshold``) is skipped with probability
  ``(sim - threshold) / (1 - threshold)`` and the previous output is shown again; after
  ``max_skip_frames`` skips in a row a frame is processed anyway.

The sampler is deterministic DDIM for VP models (epsilon / v / sample prediction: the
timesteps of the pipeline's scheduler, diffusers' DDIM update, so with a DDIM scheduler a
frame alone equals diffusers' img2img of it) and the Euler step for flow-matching models
(FLUX), written per batch element so that every frame in a stream batch can sit at its
own step. Supported pipelines: Stable Diffusion UNets without extra conditioning and FLUX.

Ours, written from the paper: the IO queue and TensorRT parts of the paper are not here.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from backends.accel.base import MethodConfig, MethodSpec, param
from backends.img2img import (
    check_size, decode_latents, denoising_steps, encode_images, is_flow, seeded_noise,
)
from backends.types import ValidationError

PAPER = "StreamDiffusion: A Pipeline-level Solution for Real-time Interactive Generation (Kodaira et al., 2023)"
RCFG_MODES = ("none", "self", "onetime")


class StreamConfig(MethodConfig):
    """The stream's options (the paper's three ideas). Defaults are the paper's settings."""

    stream_batch: bool = param(True, help="batch the denoising steps of successive frames into one model call "
                                          "(k steps: one call per frame instead of k; k-1 frames of latency)")
    rcfg: str = param("self", choices=RCFG_MODES,
                      help="residual CFG: the negative branch from the input latent ('self': 1 evaluation per step), "
                           "from one real negative pass at the first step ('onetime'), or a real pass every step "
                           "('none'); only with guidance above 1")
    delta: float = param(1.0, min=0.0, max=1.0, step=0.05,
                         help="RCFG's delta: scale of the virtual negative noise (lower = weaker guidance)")
    similarity_filter: bool = param(True, help="skip an input frame nearly identical to the last one processed, "
                                               "with a probability rising with their cosine similarity")
    threshold: float = param(0.98, min=0.5, max=0.99999, step=0.005,
                             help="similarity filter: cosine similarity above which a frame may be skipped")
    max_skip_frames: int = param(10, min=1, max=1000,
                                 help="similarity filter: after this many skips in a row, process a frame anyway")


STREAM_SPEC = MethodSpec(
    name="streamdiffusion", title="StreamDiffusion (stream batch, RCFG, similarity filter)", modalities=("image",),
    families=("unet", "dit"), paper=PAPER, lossless=None, config=StreamConfig,
    summary="img2img over a frame sequence: steps of successive frames batched, one-pass residual CFG, "
            "near-identical input frames skipped",
)


def stream_config(values: dict[str, Any] | None = None) -> StreamConfig:
    """Checked options (unknown names and out-of-range values: one-line errors)."""
    return STREAM_SPEC.build(STREAM_SPEC.validate(values or {}))


# ----------------------------------------------------------------------------- the similarity filter


def frame_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two frames' pixels (flattened)."""
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


class SimilarityFilter:
    """Decides, frame by frame, whether to process or skip. The random draw comes from a
    seeded ``random.Random``, so a stream is reproducible."""

    def __init__(self, config: StreamConfig, seed: int):
        self.config = config
        self.rng = random.Random(seed)
        self.reference: torch.Tensor | None = None
        self.skipped_in_a_row = 0

    def skip_probability(self, similarity: float) -> float:
        threshold = self.config.threshold
        return max(0.0, (similarity - threshold) / (1.0 - threshold))

    def should_skip(self, pixels: torch.Tensor) -> bool:
        if not self.config.similarity_filter or self.reference is None:
            self.reference = pixels
            return False
        probability = self.skip_probability(frame_similarity(pixels, self.reference))
        if self.skipped_in_a_row < self.config.max_skip_frames and self.rng.random() < probability:
            self.skipped_in_a_row += 1
            return True
        self.reference, self.skipped_in_a_row = pixels, 0
        return False


# ----------------------------------------------------------------------------- the schedule


@dataclass
class Schedule:
    """The steps a frame runs, as tensors indexed by step: ``signal``/``noise`` are the
    coefficients of x = signal * x0 + noise * eps at that step, ``*_next`` at the step after
    it, ``model_t`` what the denoiser is given as its timestep."""

    signal: torch.Tensor
    noise: torch.Tensor
    signal_next: torch.Tensor
    noise_next: torch.Tensor
    model_t: torch.Tensor
    flow: bool
    prediction: str  # "epsilon" | "v_prediction" | "sample" | "flow"

    @property
    def steps(self) -> int:
        return len(self.model_t)


def vp_schedule(scheduler: Any, steps: int, count: int, device: torch.device) -> Schedule:
    """The last ``count`` timesteps of ``scheduler`` at ``steps`` steps (img2img's), with
    DDIM's next level: ``t - T/steps``, the scheduler's final alpha below 0."""
    scheduler.set_timesteps(steps, device="cpu")
    timesteps = scheduler.timesteps[steps - count:].long()
    cumprod = scheduler.alphas_cumprod.double()
    final = float(getattr(scheduler, "final_alpha_cumprod", cumprod[0]))
    stride = scheduler.config.num_train_timesteps // steps
    now = cumprod[timesteps]
    prev = timesteps - stride
    nxt = torch.where(prev >= 0, cumprod[prev.clamp(min=0)], torch.tensor(final, dtype=torch.float64))
    as_float = lambda t: t.float().to(device)  # noqa: E731
    return Schedule(as_float(now.sqrt()), as_float((1 - now).sqrt()), as_float(nxt.sqrt()),
                    as_float((1 - nxt).sqrt()), timesteps.to(device), False, scheduler.config.prediction_type)


def flow_schedule(pipe: Any, steps: int, count: int, image_tokens: int, device: torch.device) -> Schedule:
    """FLUX's sigmas for ``steps`` steps (as its pipeline sets them), the last ``count``."""
    scheduler = pipe.scheduler
    sigmas = np.linspace(1.0, 1 / steps, steps)
    kwargs: dict[str, Any] = {}
    if getattr(scheduler.config, "use_dynamic_shifting", False):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = scheduler.config
        kwargs["mu"] = calculate_shift(image_tokens, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                       c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=sigmas, device="cpu", **kwargs)
    sigma = scheduler.sigmas.float()
    start = steps - count
    now, nxt = sigma[start:steps], sigma[start + 1: steps + 1]
    model_t = scheduler.timesteps[start:steps].float() / 1000  # the pipeline's timestep / 1000
    return Schedule((1 - now).to(device), now.to(device), (1 - nxt).to(device), nxt.to(device), model_t.to(device),
                    True, "flow")


def _shape(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def to_clean_and_noise(s: Schedule, idx: torch.Tensor, x: torch.Tensor, out: torch.Tensor):
    """(x0, eps) of latents ``x`` at steps ``idx`` given the model's output."""
    a, b = _shape(s.signal[idx], x), _shape(s.noise[idx], x)
    if s.prediction == "flow":  # out = eps - x0
        return x - b * out, x + a * out
    if s.prediction == "v_prediction":
        return a * x - b * out, a * out + b * x
    if s.prediction == "sample":
        return out, (x - a * out) / b
    return (x - b * out) / a, out  # epsilon


def to_model_output(s: Schedule, idx: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The model output that (x0, eps) stand for (the inverse of ``to_clean_and_noise``)."""
    a, b = _shape(s.signal[idx], x0), _shape(s.noise[idx], x0)
    if s.prediction == "flow":
        return eps - x0
    if s.prediction == "v_prediction":
        return a * eps - b * x0
    if s.prediction == "sample":
        return x0
    return eps


def next_latents(s: Schedule, idx: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """One step of each frame from its own step: Euler for flow (diffusers' update), DDIM otherwise."""
    if s.flow:
        return x + _shape(s.noise_next[idx] - s.noise[idx], x) * out
    x0, eps = to_clean_and_noise(s, idx, x, out)
    return _shape(s.signal_next[idx], x) * x0 + _shape(s.noise_next[idx], x) * eps


def virtual_negative(s: Schedule, idx: torch.Tensor, x: torch.Tensor, clean: torch.Tensor, delta: float) -> torch.Tensor:
    """RCFG's negative branch: the model output that would explain ``x`` as the reference
    ``clean`` latent plus noise (the residual noise, scaled by ``delta``)."""
    a, b = _shape(s.signal[idx], x), _shape(s.noise[idx], x)
    return to_model_output(s, idx, clean, delta * (x - a * clean) / b)


# ----------------------------------------------------------------------------- the denoiser call


class Denoiser:
    """One batched denoiser call over frames at different steps, each with the prompt's
    ("cond") or the negative prompt's ("uncond") embedding."""

    def __init__(self, pipe: Any, prompt: str, negative: str, need_negative: bool, height: int, width: int):
        self.pipe = pipe
        self.device = pipe._execution_device
        self.calls = 0
        self.evals = 0  # batch elements evaluated
        self.unet = getattr(pipe, "unet", None)
        if self.unet is not None:
            if getattr(self.unet.config, "addition_embed_type", None) not in (None, "text"):
                raise ValidationError("stream mode runs Stable Diffusion UNets without extra conditioning "
                                      "(not SDXL) and FLUX models")
            cond, uncond = pipe.encode_prompt(prompt, self.device, 1, need_negative, negative or "")
            self.embeds = {"cond": cond, "uncond": uncond}
            return
        if type(pipe).__name__ not in ("FluxPipeline", "FluxImg2ImgPipeline"):
            raise ValidationError("stream mode runs Stable Diffusion UNets and FLUX models, "
                                  f"not {type(pipe).__name__}")
        length = min(512, int(getattr(pipe.tokenizer_2, "model_max_length", 512)))
        self.embeds = {}
        for branch, text in (("cond", prompt), ("uncond", negative or "")):
            if branch == "uncond" and not need_negative:
                continue
            embeds, pooled, text_ids = pipe.encode_prompt(prompt=text, prompt_2=None, device=self.device,
                                                          num_images_per_prompt=1, max_sequence_length=length)
            self.embeds[branch] = (embeds, pooled)
        self.text_ids = text_ids
        lat_h, lat_w = 2 * (height // (pipe.vae_scale_factor * 2)), 2 * (width // (pipe.vae_scale_factor * 2))
        self.image_ids = pipe._prepare_latent_image_ids(1, lat_h // 2, lat_w // 2, self.device, cond_dtype(pipe))
        self.guidance_embeds = bool(getattr(pipe.transformer.config, "guidance_embeds", False))

    @property
    def model(self) -> torch.nn.Module:
        return self.unet if self.unet is not None else self.pipe.transformer

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, branches: list[str], guidance: float) -> torch.Tensor:
        self.calls += 1
        self.evals += len(branches)
        if self.unet is not None:
            embeds = torch.cat([self.embeds[b] for b in branches])
            return self.unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0]
        batch, channels, height, width = x.shape
        packed = self.pipe._pack_latents(x, batch, channels, height, width)
        embeds = torch.cat([self.embeds[b][0] for b in branches])
        pooled = torch.cat([self.embeds[b][1] for b in branches])
        extra = torch.full((batch,), guidance, device=x.device, dtype=x.dtype) if self.guidance_embeds else None
        out = self.pipe.transformer(hidden_states=packed, timestep=t.to(x.dtype), guidance=extra,
                                    pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=self.text_ids,
                                    img_ids=self.image_ids, return_dict=False)[0]
        scale = self.pipe.vae_scale_factor
        return self.pipe._unpack_latents(out, height * scale, width * scale, scale)


def cond_dtype(pipe: Any) -> torch.dtype:
    return pipe.transformer.dtype if getattr(pipe, "transformer", None) is not None else pipe.unet.dtype


# ----------------------------------------------------------------------------- the stream


@dataclass
class Slot:
    """One frame in flight: its latent at step ``step``, its input latent (RCFG self) and
    the negative prompt's clean estimate (RCFG onetime)."""

    frame: int
    step: int
    x: torch.Tensor
    clean_input: torch.Tensor
    clean_negative: torch.Tensor | None = None


@dataclass
class StreamStats:
    frames_in: int = 0
    frames_processed: int = 0
    frames_skipped: int = 0
    model_calls: int = 0
    model_evals: int = 0
    denoising_steps: int = 0
    seconds: float = 0.0

    @property
    def fps(self) -> float:
        return self.frames_in / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"frames_in": self.frames_in, "frames_processed": self.frames_processed,
                "frames_skipped": self.frames_skipped, "model_calls": self.model_calls,
                "model_evals": self.model_evals, "denoising_steps": self.denoising_steps,
                "seconds": round(self.seconds, 4), "fps": round(self.fps, 3)}


class StreamSession:
    """A stream over one model: ``push`` a frame, get the output frames now finished
    (in input order, a skipped frame repeating the output it stands in for); ``flush``
    at the end. Not thread-safe: hold the backend's lock around it."""

    def __init__(self, pipe: Any, prompt: str, negative: str = "", *, seed: int = 0, steps: int = 25,
                 strength: float = 0.5, guidance: float = 1.0, height: int = 64, width: int = 64,
                 config: StreamConfig | None = None):
        self.pipe, self.config = pipe, config or StreamConfig()
        self.height, self.width, self.guidance = int(height), int(width), float(guidance)
        self.count = denoising_steps(int(steps), float(strength))
        self.cfg = self.guidance > 1 and not getattr(getattr(self._model(pipe), "config", None), "guidance_embeds", False)
        self.denoiser = Denoiser(pipe, prompt, negative, self.cfg and self.config.rcfg != "self", self.height, self.width)
        device = self.denoiser.device
        latent_shape = self._latent_shape()
        self.noise = seeded_noise(latent_shape, seed, device, cond_dtype(pipe))
        if is_flow(pipe):
            tokens = (latent_shape[2] // 2) * (latent_shape[3] // 2)
            self.schedule = flow_schedule(pipe, int(steps), self.count, tokens, device)
        else:
            self.schedule = vp_schedule(pipe.scheduler, int(steps), self.count, device)
        self.filter = SimilarityFilter(self.config, seed)
        self.slots: deque[Slot] = deque()
        self.outputs: dict[int, Image.Image] = {}
        self.stands_for: dict[int, int] = {}  # input frame -> the processed frame whose output it shows
        self.emitted = 0
        self.stats = StreamStats(denoising_steps=self.count)
        self._last_processed: int | None = None

    @staticmethod
    def _model(pipe: Any) -> Any:
        return getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)

    def _latent_shape(self) -> tuple[int, ...]:
        scale = self.pipe.vae_scale_factor
        channels = self.pipe.vae.config.latent_channels
        if getattr(self.pipe, "transformer", None) is not None:  # FLUX: a 2x2-packable grid
            return (1, channels, 2 * (self.height // (scale * 2)), 2 * (self.width // (scale * 2)))
        return (1, channels, self.height // scale, self.width // scale)

    # -- frames in, frames out -----------------------------------------------------------
    def push(self, frame: Image.Image) -> list[Image.Image]:
        start = time.perf_counter()
        index = self.stats.frames_in
        self.stats.frames_in += 1
        check_size(frame, self.height, self.width, what=f"frame {index + 1}")
        pixels = self.pipe.image_processor.preprocess(frame, height=self.height, width=self.width)
        if self._last_processed is not None and self.filter.should_skip(pixels):
            self.stats.frames_skipped += 1
            self.stands_for[index] = self._last_processed
        else:
            if self._last_processed is None:
                self.filter.should_skip(pixels)  # the first frame becomes the reference
            self.stats.frames_processed += 1
            self.stands_for[index] = index
            self._last_processed = index
            self._enter(index, frame)
            if self.config.stream_batch:
                self._step_all()
            else:
                while self.slots:
                    self._step_all()
        out = self._emit()
        self.stats.seconds += time.perf_counter() - start
        return out

    def flush(self) -> list[Image.Image]:
        """Finish the frames still in flight (the stream batch's last k-1)."""
        start = time.perf_counter()
        while self.slots:
            self._step_all()
        out = self._emit()
        self.stats.seconds += time.perf_counter() - start
        return out

    def run(self, frames: list[Image.Image], progress: Callable[[int, int], None] | None = None) -> list[Image.Image]:
        """Every frame through the stream, then the flush: one output per input frame."""
        out: list[Image.Image] = []
        for i, frame in enumerate(frames):
            out += self.push(frame)
            if progress is not None:
                progress(i + 1, len(frames))
        return out + self.flush()

    # -- the work ------------------------------------------------------------------------
    def _enter(self, index: int, frame: Image.Image) -> None:
        clean = encode_images(self.pipe, [frame], self.height, self.width).to(self.noise.dtype)
        s = self.schedule
        x = s.signal[0] * clean + s.noise[0] * self.noise
        self.slots.append(Slot(index, 0, x, clean))

    def _step_all(self) -> None:
        """One model call over every frame in flight (stream batch), or over the one frame
        in flight (sequential); each frame then takes its own step."""
        slots = list(self.slots)
        idx = torch.tensor([slot.step for slot in slots], device=self.noise.device)
        x = torch.cat([slot.x for slot in slots])
        branches, inputs, times = ["cond"] * len(slots), [x], [self.schedule.model_t[idx]]
        rcfg = self.config.rcfg if self.cfg else "off"
        first = [i for i, slot in enumerate(slots) if slot.step == 0]
        if rcfg == "none":
            negatives = list(range(len(slots)))
        elif rcfg == "onetime":
            negatives = first
        else:
            negatives = []
        if negatives:
            branches += ["uncond"] * len(negatives)
            inputs.append(x[negatives])
            times.append(self.schedule.model_t[idx[negatives]])
        out = self.denoiser(torch.cat(inputs), torch.cat(times), branches, self.guidance)
        cond = out[: len(slots)]
        if rcfg != "off":
            cond = self._guided(slots, idx, x, cond, out[len(slots):], negatives, rcfg)
        x_next = next_latents(self.schedule, idx, x, cond)
        done = []
        for i, slot in enumerate(slots):
            slot.x, slot.step = x_next[i: i + 1], slot.step + 1
            if slot.step == self.schedule.steps:
                done.append(slot)
        for slot in done:
            self.slots.remove(slot)
            self.outputs[slot.frame] = decode_latents(self.pipe, slot.x)[0]
        self.stats.model_calls, self.stats.model_evals = self.denoiser.calls, self.denoiser.evals

    def _guided(self, slots, idx, x, cond, negative_out, negatives, rcfg) -> torch.Tensor:
        """CFG with the negative branch real (``none``, ``onetime`` at step 0) or virtual (RCFG)."""
        uncond = torch.empty_like(cond)
        for j, i in enumerate(negatives):
            uncond[i] = negative_out[j]
            if rcfg == "onetime":  # keep the negative's clean estimate for the frame's later steps
                clean, _ = to_clean_and_noise(self.schedule, idx[i: i + 1], x[i: i + 1], negative_out[j: j + 1])
                slots[i].clean_negative = clean
        virtual = [i for i in range(len(slots)) if i not in negatives]
        if virtual:
            refs = torch.cat([slots[i].clean_input if rcfg == "self" else slots[i].clean_negative for i in virtual])
            uncond[virtual] = virtual_negative(self.schedule, idx[virtual], x[virtual], refs, self.config.delta)
        return uncond + self.guidance * (cond - uncond)

    def _emit(self) -> list[Image.Image]:
        out = []
        while self.emitted < self.stats.frames_in:
            source = self.stands_for.get(self.emitted)
            if source is None or source not in self.outputs:
                break
            out.append(self.outputs[source])
            self.emitted += 1
        # outputs no later frame can stand in for any more, and frames already shown
        for key in [k for k in self.outputs if k < (self._last_processed or 0)]:
            del self.outputs[key]
        for key in [k for k in self.stands_for if k < self.emitted]:
            del self.stands_for[key]
        return out

