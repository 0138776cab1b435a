"""Text-to-video through any diffusers pipeline (Wan, CogVideoX, LTX, HunyuanVideo...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from backends.image import DiffusionBackend
from backends.plan import DiffusionPlan
from backends.types import Request


class VideoBackend(DiffusionBackend):
    modality = "video"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.family = {"dit": "video-dit", "unet": "video-unet"}.get(self.family, self.family)

    @classmethod
    def from_pretrained(cls, model_id: str, source: str, device: torch.device, dtype: torch.dtype) -> "VideoBackend":
        index = Path(source) / "model_index.json"
        if index.is_file() and json.loads(index.read_text()).get("_class_name") == "ShapesVideoPipeline":
            # the bundled tiny video model: a Wan-layout transformer with a CLIP encoder, no Wan VAE
            from backends.tiny.video_pipeline import ShapesVideoPipeline

            pipe = ShapesVideoPipeline.from_pretrained(source, torch_dtype=dtype)
            return cls(model_id, pipe.to(device), device, dtype)
        return super().from_pretrained(model_id, source, device, dtype)

    def build_plan(self, request: Request) -> DiffusionPlan:
        plan = self.base_plan(request)
        for key, arg in (("height", "height"), ("width", "width"), ("frames", "num_frames")):
            if request.params.get(key) and arg in self.call_params:
                plan.kwargs[arg] = int(request.params[key])
        plan.kwargs["output_type"] = "pil"
        return plan

    def extract_output(self, output: Any) -> list:
        frames = output.frames[0]
        return list(frames)
