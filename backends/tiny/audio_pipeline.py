"""``SynthAudioPipeline``: text -> log-mel spectrogram (UNet diffusion) -> waveform (Griffin-Lim).

A diffusers ``DiffusionPipeline`` with the components ``unet`` (``UNet2DConditionModel``),
``text_encoder`` (``CLIPTextModel``), ``tokenizer`` (``CLIPTokenizer``) and ``scheduler``,
saved and loaded with ``save_pretrained`` / ``from_pretrained`` like any hub pipeline.
The denoising loop is the one of ``StableDiffusionPipeline``: batched [uncond, cond]
classifier-free guidance read from ``do_classifier_free_guidance`` at every step, and a
step-end callback that may replace ``latents`` / ``prompt_embeds``, so the studio's CFG
truncation, DeepCache and sampler swaps work on it unchanged.

The "latents" are the spectrogram itself (1 x 64 mels x frames, scaled to about
[-1, 1]); the UNet also sees a second, constant input channel that holds each row's
mel position (-1 at the lowest band, +1 at the highest), because pitch *is* position
here. The vocoder has no weights: ``GriffinLimVocoder`` inverts the mel filterbank and
runs fast Griffin-Lim; its settings live in the pipeline config (``model_index.json``).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from backends.tiny import audio_data as ad
from backends.tiny.pipeline_common import GuidanceAttributesMixin


@dataclass
class SynthAudioPipelineOutput(BaseOutput):
    audios: np.ndarray | torch.Tensor  # [batch, samples]


class GriffinLimVocoder(torch.nn.Module):
    """Scaled log-mel [batch, 1, mels, frames] -> waveform [batch, samples]; no weights.

    A module (not a pipeline component) so timing code can charge its ``forward`` to the
    'decode' stage, and so ``vocoder.config.sampling_rate`` says the rate as in AudioLDM.
    """

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, n_mels: int, iters: int):
        super().__init__()
        if (sample_rate, n_fft, hop_length, n_mels) != (ad.SAMPLE_RATE, ad.N_FFT, ad.HOP, ad.N_MELS):
            raise ValueError(
                f"this pipeline folder asks for a {sample_rate} Hz / n_fft {n_fft} / hop {hop_length} / "
                f"{n_mels} mels spectrogram; backends.tiny.audio_data implements "
                f"{ad.SAMPLE_RATE} / {ad.N_FFT} / {ad.HOP} / {ad.N_MELS}"
            )
        self.config = SimpleNamespace(sampling_rate=sample_rate, n_fft=n_fft, hop_length=hop_length,
                                      n_mels=n_mels, griffin_lim_iters=iters)

    def forward(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        magnitude = ad.spec_to_magnitude(spec)
        wave = ad.griffin_lim(magnitude, iters=self.config.griffin_lim_iters, length=length)
        return wave.clamp(-1.0, 1.0)


def frequency_channel(batch: int, n_mels: int, frames: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The constant second UNet input: each row's mel position in [-1, 1]."""
    ramp = torch.linspace(-1.0, 1.0, n_mels, dtype=dtype, device=device)
    return ramp.view(1, 1, n_mels, 1).expand(batch, 1, n_mels, frames)


def unet_input(spec: torch.Tensor) -> torch.Tensor:
    b, _, m, f = spec.shape
    return torch.cat([spec, frequency_channel(b, m, f, spec.dtype, spec.device)], dim=1)


class SynthAudioPipeline(GuidanceAttributesMixin, DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(self, unet, text_encoder, tokenizer, scheduler, sample_rate: int = ad.SAMPLE_RATE,
                 n_fft: int = ad.N_FFT, hop_length: int = ad.HOP, n_mels: int = ad.N_MELS,
                 griffin_lim_iters: int = 32):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels,
                                griffin_lim_iters=griffin_lim_iters)
        self.vocoder = GriffinLimVocoder(sample_rate, n_fft, hop_length, n_mels, griffin_lim_iters)
        self._guidance_scale = 1.0

    @property
    def sampling_rate(self) -> int:
        return int(self.config.sample_rate)

    def frames_for(self, audio_length_in_s: float | None) -> tuple[int, int]:
        """(spectrogram frames, output samples): frames rounded up to the UNet's multiple of 8."""
        hop = self.config.hop_length
        samples = ad.N_SAMPLES if audio_length_in_s is None else max(1, round(audio_length_in_s * self.sampling_rate))
        mult = 2 ** (len(self.unet.config.block_out_channels) - 1)
        frames = -(-(samples // hop + 1) // mult) * mult
        return frames, samples

    @torch.no_grad()
    def encode_prompt(self, prompt: list[str], device) -> torch.Tensor:
        ids = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(device))[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        audio_length_in_s: float | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
    ):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts)
        for name in callback_on_step_end_tensor_inputs:
            if name not in self._callback_tensor_inputs:
                raise ValueError(f"callback tensor input {name!r} is not one of {self._callback_tensor_inputs}")
        self._guidance_scale = guidance_scale
        device = self._execution_device

        prompt_embeds = self.encode_prompt(prompts, device)
        negative_prompt_embeds = None
        if self.do_classifier_free_guidance:
            negatives = [""] * batch if negative_prompt is None else (
                [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt))
            negative_prompt_embeds = self.encode_prompt(negatives, device)
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        frames, samples = self.frames_for(audio_length_in_s)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        from diffusers.utils.torch_utils import randn_tensor

        shape = (batch, self.unet.config.out_channels, self.config.n_mels, frames)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)
        self._num_timesteps = len(timesteps)

        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                if hasattr(self.scheduler, "scale_model_input"):  # flow-matching schedulers have none
                    model_input = self.scheduler.scale_model_input(model_input, t)
                noise_pred = self.unet(unet_input(model_input), t, encoder_hidden_states=prompt_embeds,
                                       return_dict=False)[0]
                if self.do_classifier_free_guidance:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + self.guidance_scale * (cond - uncond)
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    local = {"latents": latents, "prompt_embeds": prompt_embeds,
                             "negative_prompt_embeds": negative_prompt_embeds}
                    callback_kwargs = {k: local[k] for k in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress_bar.update()

        if output_type == "latent":
            audio = latents
        else:
            length = (frames - 1) * self.config.hop_length
            audio = self.vocoder(latents.float().clamp(-1.5, 1.5), length)[:, :samples]
            if audio.shape[1] < samples:
                audio = torch.nn.functional.pad(audio, (0, samples - audio.shape[1]))
            if output_type == "np":
                audio = audio.cpu().numpy()
        self.maybe_free_model_hooks()
        if not return_dict:
            return (audio,)
        return SynthAudioPipelineOutput(audios=audio)
