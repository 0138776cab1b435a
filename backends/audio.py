"""Text-to-audio through diffusers audio pipelines (AudioLDM 2, Stable Audio Open...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backends.image import DiffusionBackend
from backends.plan import DiffusionPlan
from backends.types import Request

LENGTH_ARGS = ("audio_length_in_s", "audio_end_in_s")


class AudioBackend(DiffusionBackend):
    modality = "audio"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.family = {"dit": "audio-dit", "unet": "audio-unet"}.get(self.family, self.family)

    @classmethod
    def from_pretrained(cls, model_id: str, source: str, device: torch.device, dtype: torch.dtype) -> "AudioBackend":
        """Our own ``SynthAudioPipeline`` folders (the bundled model) load with that class,
        codec LMs (MusicGen) as a ``CodecLMBackend``, speech models as a ``TTSBackend``;
        every other folder or hub id goes through ``DiffusionPipeline``."""
        from backends.codec_lm import CodecLMBackend, is_codec_lm_source
        from backends.tts import TTSBackend, is_tts_source

        if is_codec_lm_source(source):  # MusicGen & co: a transformers model, not a pipeline
            return CodecLMBackend.from_pretrained(model_id, source, device, dtype)
        if is_tts_source(source):  # VITS / MMS-TTS, Bark, SpeechT5: transformers' text-to-speech pipeline
            return TTSBackend.from_pretrained(model_id, source, device, dtype)
        index = Path(source) / "model_index.json"
        if index.is_file() and json.loads(index.read_text()).get("_class_name") == "SynthAudioPipeline":
            from backends.tiny.audio_pipeline import SynthAudioPipeline

            pipe = SynthAudioPipeline.from_pretrained(source, torch_dtype=dtype)
            return cls(model_id, pipe.to(device), device, dtype)
        return super().from_pretrained(model_id, source, device, dtype)

    @property
    def sample_rate(self) -> int:
        for owner in (getattr(self.pipe, "vae", None), getattr(self.pipe, "vocoder", None)):
            rate = getattr(getattr(owner, "config", None), "sampling_rate", None)
            if rate:
                return int(rate)
        return 16000

    def build_plan(self, request: Request) -> DiffusionPlan:
        plan = self.base_plan(request)
        seconds = request.params.get("seconds")
        if seconds:
            arg = next((a for a in LENGTH_ARGS if a in self.call_params), None)
            if arg:
                plan.kwargs[arg] = float(seconds)
        if "output_type" in self.call_params:
            plan.kwargs["output_type"] = "np"
        return plan

    def extract_output(self, output: Any) -> tuple[np.ndarray, int]:
        audio = np.asarray(output.audios[0], dtype=np.float32)
        return audio, self.sample_rate
