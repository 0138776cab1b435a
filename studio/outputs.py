"""Output files under the data dir: PNG, MP4/GIF, WAV, TXT. The DB stores only paths.

Files are written to a temporary name and renamed into place, so a crash never leaves
a half-written file under a name that a history row could point to.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

EXTENSIONS = {"image": ".png", "text": ".txt", "audio": ".wav", "video": ".mp4"}


class OutputStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def new_path(self, modality: str, suffix: str | None = None) -> Path:
        day = self.root / datetime.now().strftime("%Y-%m-%d")
        day.mkdir(parents=True, exist_ok=True)
        return day / f"{modality}-{uuid.uuid4().hex[:12]}{suffix or EXTENSIONS[modality]}"

    def save(self, modality: str, output: Any, fps: int = 8) -> Path:
        if modality == "image":
            return self._atomic(self.new_path("image"), lambda p: output.save(p, format="PNG"))
        if modality == "text":
            return self._atomic(self.new_path("text"), lambda p: Path(p).write_text(str(output), encoding="utf-8"))
        if modality == "audio":
            import soundfile

            waveform, rate = output
            data = np.asarray(waveform, dtype=np.float32)
            data = data.T if data.ndim == 2 and data.shape[0] < data.shape[1] else data
            return self._atomic(self.new_path("audio"), lambda p: soundfile.write(p, data, int(rate), format="WAV"))
        if modality == "video":
            return self.save_video(output, fps)
        raise ValueError(f"unknown modality {modality}")

    def save_video(self, frames: list, fps: int) -> Path:
        import imageio.v3 as iio

        arrays = [np.asarray(f.convert("RGB") if hasattr(f, "convert") else f) for f in frames]
        try:
            import imageio_ffmpeg  # noqa: F401

            return self._atomic(
                self.new_path("video", ".mp4"),
                lambda p: iio.imwrite(p, np.stack(arrays), extension=".mp4", fps=fps, codec="libx264",
                                      macro_block_size=1),
            )
        except Exception:  # no ffmpeg here: an animated GIF still plays everywhere
            return self._atomic(
                self.new_path("video", ".gif"),
                lambda p: iio.imwrite(p, np.stack(arrays), extension=".gif", duration=1000 / fps, loop=0),
            )

    def _atomic(self, path: Path, write) -> Path:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def orphans(self, referenced: set[str]) -> list[Path]:
        """Files under the root that no history row points to (left by a crash)."""
        referenced = {str(Path(p).resolve()) for p in referenced}
        return [
            p for p in self.root.rglob("*")
            if p.is_file() and (p.name.startswith(".tmp-") or str(p.resolve()) not in referenced)
        ]
