"""``ShapesVideoPipeline``: text-to-video with a Wan-layout transformer, any 2-D VAE or none.

``WanPipeline`` needs ``AutoencoderKLWan`` and a UMT5 encoder; the bundled tiny video model
has a CLIP encoder and works in pixel space (or per-frame ``AutoencoderKL`` latents), so it
gets this small pipeline. It follows the diffusers conventions the studio's methods rely
on: batched CFG on ``[uncond, cond]`` with ``do_classifier_free_guidance`` /
``_guidance_scale`` (CFG truncation switches guidance off from the step-end callback),
``_callback_tensor_inputs``, the transformer called inside
``cache_context("cond_uncond")`` (FirstBlockCache, TaylorSeer, MagCache... keep their
state per context) and ``current_timestep`` (PyramidAttentionBroadcast reads it).

Example::

    pipe = ShapesVideoPipeline.from_pretrained("assets/tiny-video-shapes")
    frames = pipe("a red circle moving right on white", num_inference_steps=25,
                  guidance_scale=5.0, generator=torch.Generator().manual_seed(0)).frames[0]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

import backends.tiny.film_wan  # noqa: F401  diffusers loads a component class only from an imported module
from backends.tiny.pipeline_common import GuidanceAttributesMixin
from PIL import Image


@dataclass
class ShapesVideoPipelineOutput(BaseOutput):
    """``frames``: one list of PIL frames per prompt (``output_type="pil"``), else an array/tensor
    of shape (batch, frames, height, width, 3) in [0, 1] ("np") / (batch, frames, 3, H, W) ("pt")."""

    frames: Any


class ShapesVideoPipeline(GuidanceAttributesMixin, DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(self, transformer, text_encoder, tokenizer, scheduler, vae=None,
                 default_frames: int = 8, default_size: int = 32, prediction_type: str = "flow"):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler)
        # what it was trained on; prediction_type "sample": the transformer predicts the clean clip
        # (x-prediction, as in JiT for large-patch pixel transformers), turned into a velocity here
        self.register_to_config(default_frames=default_frames, default_size=default_size,
                                prediction_type=prediction_type)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self._guidance_scale = 1.0
        self._current_timestep = None
        self._num_timesteps = 0
        self._interrupt = False

    # -- attributes diffusers pipelines expose (callbacks and cache hooks read them)
    @property
    def current_timestep(self):
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def encode_prompt(self, prompt: str | list[str], device: torch.device) -> torch.Tensor:
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(device))[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 5.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] | list[str] = ("latents",),
    ):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts)
        num_frames = num_frames or self.config.default_frames
        height, width = height or self.config.default_size, width or self.config.default_size
        for name in callback_on_step_end_tensor_inputs:
            if name not in self._callback_tensor_inputs:
                raise ValueError(f"callback tensor input {name!r} not in {self._callback_tensor_inputs}")
        p_t, p_h, p_w = self.transformer.config.patch_size
        f_lat, h_lat, w_lat = num_frames, height // self.vae_scale_factor, width // self.vae_scale_factor
        if f_lat % p_t or h_lat % p_h or w_lat % p_w:
            raise ValueError(f"frames/height/width must be multiples of {(p_t, p_h * self.vae_scale_factor, p_w * self.vae_scale_factor)}")
        self._guidance_scale = guidance_scale
        self._interrupt = False
        device = self._execution_device
        dtype = self.transformer.dtype

        prompt_embeds = self.encode_prompt(prompts, device)
        if self.do_classifier_free_guidance:
            neg = negative_prompt if negative_prompt is not None else ""
            neg = [neg] * batch if isinstance(neg, str) else list(neg)
            prompt_embeds = torch.cat([self.encode_prompt(neg, device), prompt_embeds])
        prompt_embeds = prompt_embeds.to(dtype)

        shape = (batch, self.transformer.config.in_channels, f_lat, h_lat, w_lat)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device, torch.float32)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                # re-read every step: a callback may have switched guidance off mid-loop
                cfg = self.do_classifier_free_guidance and prompt_embeds.shape[0] == 2 * batch
                model_in = torch.cat([latents] * 2) if cfg else latents
                with self.transformer.cache_context("cond_uncond"):
                    noise_pred = self.transformer(
                        hidden_states=model_in.to(dtype), timestep=t.expand(model_in.shape[0]),
                        encoder_hidden_states=prompt_embeds, return_dict=False,
                    )[0].float()
                if cfg:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + self.guidance_scale * (cond - uncond)
                if self.config.prediction_type == "sample":  # x-prediction -> velocity (noise - x0)
                    noise_pred = (latents - noise_pred) / self.scheduler.sigmas[i].clamp(min=1e-3)
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    local = {"latents": latents, "prompt_embeds": prompt_embeds}
                    kwargs = {k: local[k] for k in callback_on_step_end_tensor_inputs}
                    out = callback_on_step_end(self, i, t, kwargs) or {}
                    latents = out.pop("latents", latents)
                    prompt_embeds = out.pop("prompt_embeds", prompt_embeds)
                progress.update()
        self._current_timestep = None

        if output_type == "latent":
            video = latents
        else:
            video = self.decode_latents(latents)  # (B, F, 3, H, W) in [0, 1]
            if output_type == "np":
                video = video.permute(0, 1, 3, 4, 2).cpu().numpy()
            elif output_type == "pil":
                arr = (video.permute(0, 1, 3, 4, 2).cpu().numpy() * 255).round().astype(np.uint8)
                video = [[Image.fromarray(frame) for frame in clip] for clip in arr]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return ShapesVideoPipelineOutput(frames=video)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = latents.shape
        flat = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        if self.vae is not None:  # per-frame 2-D VAE
            flat = flat.to(self.vae.dtype) / self.vae.config.scaling_factor
            flat = self.vae.decode(flat, return_dict=False)[0]
        flat = (flat.float() / 2 + 0.5).clamp(0, 1)
        return flat.reshape(b, f, *flat.shape[1:])
