"""Text-to-video through any diffusers pipeline (Wan, CogVideoX, LTX, HunyuanVideo...)."""

from __future__ import annotations

from typing import Any

from backends.image import DiffusionBackend
from backends.types import Request


class VideoBackend(DiffusionBackend):
    modality = "video"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.family = {"dit": "video-dit", "unet": "video-unet"}.get(self.family, self.family)

    def build_call(self, request: Request) -> dict[str, Any]:
        call = self.base_call(request)
        for key, arg in (("height", "height"), ("width", "width"), ("frames", "num_frames")):
            if request.params.get(key) and arg in self.call_params:
                call[arg] = int(request.params[key])
        call["output_type"] = "pil"
        return call

    def extract_output(self, output: Any) -> list:
        frames = output.frames[0]
        return list(frames)
