"""Text-to-audio with a codec language model (MusicGen and its relatives, via transformers).

The model writes EnCodec codes token by token and the codec decodes them to a waveform,
so the accelerations that apply are the decoding ones of the text work, not the
diffusion caches. Same decoding seam as ``backends.text``: ``build_plan`` gives a
``DecodingPlan``, methods edit it, and ``decoder`` (None = transformers' ``generate``) may replace the loop
with one of ``backends.accel._codec_decoding``'s, e.g. speculative decoding with a
smaller model of the same family.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from backends.accel._codec_decoding import CodecSession, greedy_loop
from backends.accel._decoding import Sampling
from backends.base import DraftingBackend, ProgressFn
from backends.catalog import local_model_type
from backends.plan import DecodingPlan
from backends.timing import StageTimer
from backends.types import Request

CODEC_LM_TYPES = ("musicgen", "musicgen_melody")
DEFAULT_SECONDS = 4.0
# The natural draft for each MusicGen size: same codec, same text encoder, fewer layers.
PAIRED_DRAFTS = {
    "facebook/musicgen-medium": "facebook/musicgen-small",
    "facebook/musicgen-large": "facebook/musicgen-small",
    "facebook/musicgen-stereo-medium": "facebook/musicgen-stereo-small",
    "facebook/musicgen-stereo-large": "facebook/musicgen-stereo-small",
}


def is_codec_lm_source(source: str) -> bool:
    """True for a local folder holding a MusicGen-type transformers model (hub ids: by name)."""
    model_type = local_model_type(source)
    if model_type is not None:
        return model_type in CODEC_LM_TYPES
    return "musicgen" in source.lower() and not (Path(source) / "model_index.json").exists()


def load_codec_lm(source: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoProcessor, MusicgenForConditionalGeneration

    processor = AutoProcessor.from_pretrained(source)
    model = MusicgenForConditionalGeneration.from_pretrained(source, dtype=dtype).to(device).eval()
    return model, processor


class CodecLMBackend(DraftingBackend):
    modality = "audio"
    unused_params = ("steps",)  # a token LM: no denoising schedule
    load_model = staticmethod(load_codec_lm)

    def __init__(self, model_id: str, model: Any, processor: Any, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, draft_id: str | None = None):
        super().__init__(model_id, model, device, dtype, draft_id)
        self.processor = processor
        self.family = "codec-lm"

    @classmethod
    def from_pretrained(cls, model_id: str, source: str, device: torch.device, dtype: torch.dtype) -> "CodecLMBackend":
        model, processor = load_codec_lm(source, device, dtype)
        return cls(model_id, model, processor, device, dtype, draft_id=PAIRED_DRAFTS.get(model_id))

    # -- Backend -------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module | None:
        return self.model.decoder  # its forwards are the model evaluations

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if self.model is not None:
            dec = self.model.decoder.config
            info.update(arch=type(self.model).__name__, layers=dec.num_hidden_layers, codebooks=dec.num_codebooks,
                        frame_rate=self.frame_rate, sample_rate=self.sample_rate, draft=self.draft_id)
        return info

    @property
    def sample_rate(self) -> int:
        return int(self.model.config.audio_encoder.sampling_rate)

    @property
    def frame_rate(self) -> float:
        enc = self.model.config.audio_encoder
        return float(getattr(enc, "frame_rate", None) or enc.sampling_rate / float(np.prod(enc.upsampling_ratios)))

    def build_plan(self, request: Request) -> DecodingPlan:
        params = request.params
        seconds = float(params.get("seconds") or DEFAULT_SECONDS)
        num_codebooks = int(self.model.decoder.num_codebooks)
        # generate counts the delay pattern's K staggered positions in max_new_tokens
        max_new_tokens = max(1, int(round(seconds * self.frame_rate))) + num_codebooks - 1
        temperature = float(params.get("temperature") or 0.0)
        guidance = params.get("guidance")
        guidance = float(guidance if guidance is not None else (self.model.generation_config.guidance_scale or 3.0))
        inputs = self.processor(text=[request.prompt], padding=True, return_tensors="pt")
        return DecodingPlan(
            input_ids=inputs["input_ids"].to(self.device), attention_mask=inputs["attention_mask"].to(self.device),
            guidance_scale=guidance, max_new_tokens=max_new_tokens, seed=int(request.seed),
            sampling=Sampling(do_sample=temperature > 0, temperature=temperature or 1.0,
                              top_k=int(params.get("top_k") or 0), seed=int(request.seed)),
        )

    def generate(self, plan: DecodingPlan, timer: StageTimer, progress: ProgressFn | None) -> tuple[np.ndarray, int]:
        total = plan.max_new_tokens + 1

        def on_progress(length: int) -> bool:
            if progress is not None:
                progress(length, total, "decode")
            return False

        start = time.perf_counter()
        with torch.inference_mode():
            if plan.decoder is None:
                codes = self._hf_generate(plan, on_progress)
            else:
                codes = plan.decoder(self, plan, on_progress)
            timer.seconds["generate"] += time.perf_counter() - start
            with timer.stage("codec"):
                audio = self.decode_codes(codes)
        wave = audio[0].float().cpu().numpy()
        wave = wave[0] if wave.shape[0] == 1 else wave.T  # mono -> (n,), stereo -> (n, 2)
        plan.extra.update(frames=int(codes.shape[-1]), positions=plan.max_new_tokens,
                              audio_seconds=round(wave.shape[0] / self.sample_rate, 3),
                              output_codes=codes[0, 0].tolist())
        return np.ascontiguousarray(wave, dtype=np.float32), self.sample_rate

    def session(self, model: Any, plan: DecodingPlan) -> CodecSession:
        """A decoding session for ``model`` (the target or a draft) on this plan's prompt."""
        return CodecSession(model, plan.input_ids, plan.attention_mask, plan.guidance_scale,
                            max_length=plan.max_new_tokens + 1)

    def plain_codes(self, plan: DecodingPlan) -> torch.Tensor:
        """Greedy codes from our own loop (what the fast loops are checked against)."""
        session = self.session(self.model, plan)
        return session.codes(greedy_loop(session))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(1, 1, K, frames) codes -> (1, channels, samples) audio, as MusicGen's ``generate`` decodes."""
        codec = self.model.audio_encoder
        if self.model.decoder.config.audio_channels == 1:
            return codec.decode(codes, audio_scales=[None]).audio_values
        left = codec.decode(codes[:, :, ::2, :], audio_scales=[None]).audio_values
        right = codec.decode(codes[:, :, 1::2, :], audio_scales=[None]).audio_values
        return torch.cat([left, right], dim=1)

    @contextlib.contextmanager
    def _codes_from_generate(self):
        """Let ``generate`` hand back its codes instead of decoding them, so the baseline and
        our own loops decode through the same ``decode_codes`` call."""
        captured: list[torch.Tensor] = []
        codec = self.model.audio_encoder

        def capture(codes, *args, **kwargs):
            captured.append(codes)
            return SimpleNamespace(audio_values=torch.zeros(1, 1, 0))

        codec.decode = capture  # instance attribute shadows the method
        try:
            yield captured
        finally:
            del codec.decode

    def _hf_generate(self, plan: DecodingPlan, on_progress=None) -> torch.Tensor:
        from transformers import GenerationConfig

        sampling: Sampling = plan.sampling
        kwargs = dict(plan.kwargs)
        probe = GenerationConfig()
        settings = {k: kwargs.pop(k) for k in list(kwargs) if hasattr(probe, k)}
        gen = self.model.generation_config
        config = GenerationConfig(
            max_new_tokens=plan.max_new_tokens, do_sample=sampling.do_sample, guidance_scale=plan.guidance_scale,
            decoder_start_token_id=gen.decoder_start_token_id, pad_token_id=gen.pad_token_id,
            bos_token_id=gen.bos_token_id, **settings,
        )
        if sampling.do_sample:
            config.temperature, config.top_k = sampling.temperature, sampling.top_k or None
            torch.manual_seed(sampling.seed)
        # MusicGen's generate streams only the start column: count decoder forwards instead
        length, total = [1], plan.max_new_tokens + 1

        def step(*_args) -> None:
            length[0] += 1
            if on_progress is not None:
                on_progress(min(length[0], total))

        handle = self.model.decoder.register_forward_pre_hook(step)
        try:
            with self._codes_from_generate() as captured:
                self.model.generate(input_ids=plan.input_ids, attention_mask=plan.attention_mask,
                                    generation_config=config, **kwargs)
        finally:
            handle.remove()
        if self.model.decoder.config.audio_channels == 1:
            return captured[0]
        left, right = captured  # generate decodes stereo as two mono halves; interleave them back
        codes = torch.empty(*left.shape[:2], left.shape[2] * 2, left.shape[3], dtype=left.dtype, device=left.device)
        codes[:, :, ::2], codes[:, :, 1::2] = left, right
        return codes
