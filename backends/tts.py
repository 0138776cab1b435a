"""Text-to-speech through transformers' ``text-to-speech`` pipeline (VITS / MMS-TTS, Bark,
SpeechT5 with its vocoder, FastSpeech2-Conformer...): whatever the pipeline loads.

These models write one waveform per call with no denoising loop or long decode to
shorten, so no acceleration method targets their family ("tts") yet; they are here so
the Audio tab, Compare and History work for speech as for music and sound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from backends.base import Backend, ProgressFn, module_bytes
from backends.catalog import local_model_type
from backends.timing import StageTimer
from backends.plan import RunPlan
from backends.types import Request

TTS_TYPES = ("vits", "bark", "speecht5", "fastspeech2_conformer", "seamless_m4t", "seamless_m4t_v2")
TTS_NAME_HINTS = ("mms-tts", "bark", "speecht5_tts", "vits", "fastspeech2")


def is_tts_source(source: str) -> bool:
    model_type = local_model_type(source)
    if model_type is not None:
        return model_type in TTS_TYPES
    return any(hint in source.lower() for hint in TTS_NAME_HINTS) and not (Path(source) / "model_index.json").exists()


class TTSBackend(Backend):
    modality = "audio"
    unused_params = ("steps", "guidance")  # one forward pass, no schedule, no guidance

    def __init__(self, model_id: str, pipe: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(model_id, torch.device(device or pipe.model.device), dtype or pipe.model.dtype)
        self.pipe = pipe
        self.family = "tts"

    @classmethod
    def from_pretrained(cls, model_id: str, source: str, device: torch.device, dtype: torch.dtype) -> "TTSBackend":
        from transformers import pipeline

        return cls(model_id, pipeline("text-to-speech", model=source, device=device, dtype=dtype), device, dtype)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, model_id: str = "in-memory") -> "TTSBackend":
        from transformers import pipeline

        return cls(model_id, pipeline("text-to-speech", model=model, tokenizer=tokenizer))

    @property
    def denoiser(self) -> torch.nn.Module | None:
        return self.pipe.model

    def memory_bytes(self) -> int:
        return module_bytes(self.pipe.model, getattr(self.pipe, "vocoder", None))

    def unload(self) -> None:
        self.pipe = None

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if self.pipe is not None:
            info.update(arch=type(self.pipe.model).__name__, sample_rate=self.pipe.sampling_rate)
        return info

    def build_plan(self, request: Request) -> RunPlan:
        return RunPlan(kwargs={"text_inputs": request.prompt}, seed=int(request.seed))

    def generate(self, plan: RunPlan, timer: StageTimer, progress: ProgressFn | None) -> tuple[np.ndarray, int]:
        torch.manual_seed(plan.seed)  # VITS samples its durations and noise from the global RNG
        with timer.stage("synthesis"), torch.inference_mode():
            out = self.pipe(**plan.kwargs)
        if progress is not None:
            progress(1, 1, "synthesis")
        audio = np.asarray(out["audio"], dtype=np.float32)
        audio = audio[0] if audio.ndim == 2 and audio.shape[0] == 1 else (audio.T if audio.ndim == 2 else audio)
        plan.extra["audio_seconds"] = round(audio.shape[0] / out["sampling_rate"], 3)
        return np.ascontiguousarray(audio), int(out["sampling_rate"])
