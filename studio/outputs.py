"""Output files under the data dir: PNG, MP4/GIF, WAV, TXT. The DB stores only paths.

Files are written to a temporary name and renamed into place, so a crash never leaves
a half-written file under a name that a history row could point to.

Rows store paths RELATIVE to the data dir (``outputs/2026-11-30/image-abc.png``) so a
data dir can be moved or restored elsewhere; every stored path is resolved against the
current data dir and checked to lie inside the outputs folder before it is read,
served or deleted, because a row's path is data, and data can be edited.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import numpy as np

EXTENSIONS = {"image": ".png", "text": ".txt", "audio": ".wav", "video": ".mp4"}
STORIES = "stories"  # outputs/stories/<story run id>-<random>/: story.html, story.md, step-N.png

log = logging.getLogger(__name__)


class OutputStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.root.parent
        self.real_root = self.root.resolve()  # resolved once: each resolve() costs system calls

    def new_path(self, modality: str, suffix: str | None = None) -> Path:
        day = self.root / datetime.now().strftime("%Y-%m-%d")
        day.mkdir(parents=True, exist_ok=True)
        return day / f"{modality}-{uuid.uuid4().hex[:12]}{suffix or EXTENSIONS[modality]}"

    # -- stored paths ------------------------------------------------------------------
    def relative(self, path: str | os.PathLike) -> str:
        """The form a row stores: relative to the data dir, with forward slashes. A path
        outside the outputs folder is refused (ValueError): rows never point elsewhere."""
        real = Path(path).resolve()
        rel = real.relative_to(self.real_root)  # raises ValueError outside the root
        return (Path(self.root.name) / rel).as_posix()

    def resolve(self, stored: str | os.PathLike | None) -> Path | None:
        """The real file a stored path names, or None when it lies outside the outputs
        folder (an absolute path elsewhere, ``..``, a symlink leading out)."""
        if not stored:
            return None
        path = Path(stored)
        if not path.is_absolute():
            path = self.data_dir / path
        try:
            real = path.resolve()
            real.relative_to(self.real_root)
        except (ValueError, OSError, RuntimeError):
            return None
        return real

    def deletable(self, stored: str | None) -> Path | None:
        """The file a stored path names, for deleting: like ``resolve``, and moreover
        reached without any symlink (a link inside outputs/ may point at another run's
        file; deleting a row removes the row's own file and nothing it points to)."""
        real = self.resolve(stored)
        if real is None:
            return None
        lexical = os.path.normpath(os.path.join(str(self.real_root.parent), str(stored)))
        return real if lexical == str(real) and not os.path.islink(lexical) else None

    def new_story_folder(self, story_id: int) -> Path:
        """A fresh folder for one story's files, never an existing one: two histories on
        one data dir (another --db) share run ids, so the name carries a random part too."""
        folder = self.root / STORIES / f"{int(story_id)}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True, exist_ok=False)
        return folder

    def story_folder_of(self, stored: str | None) -> Path | None:
        """The folder a story row's own story.html lies in, when it is a story folder inside
        outputs/ (so deleting a story removes its files and nobody else's)."""
        page = self.resolve(stored)
        if page is None or page.parent.parent != self.real_root / STORIES:
            return None
        return page.parent

    def match_moved(self, stored: str) -> str | None:
        """For an absolute path from an older data dir location: the same file here,
        matched by the part after its last ``outputs/`` component (or ``stories/``, where
        older versions kept stories), if it exists."""
        parts = Path(stored).parts
        for anchor, base in ((self.root.name, self.root), (STORIES, self.root / STORIES)):
            if anchor not in parts:
                continue
            index = len(parts) - 1 - parts[::-1].index(anchor)
            tail = parts[index + 1:]
            if not tail or any(p in ("..", ".") for p in tail):
                continue
            candidate = base.joinpath(*tail)
            if candidate.is_file() and self.resolve(candidate) is not None:
                return self.relative(candidate)
        return None

    def adopt_legacy_stories(self) -> int:
        """Older versions wrote stories to DATA_DIR/stories/<id>/, outside the outputs
        folder (so neither served nor deletable now). Move each folder to
        outputs/stories/<id>/ unless one is already there; nothing is deleted."""
        legacy = self.data_dir / STORIES
        if not legacy.is_dir() or legacy.is_symlink():
            return 0
        moved = 0
        for folder in legacy.iterdir():
            target = self.root / STORIES / folder.name
            if folder.is_dir() and not folder.is_symlink() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(folder), str(target))
                moved += 1
        if moved:
            log.info("moved %d story folder(s) from %s to %s", moved, legacy, self.root / STORIES)
        return moved

    # -- writing -----------------------------------------------------------------------
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

    def save_tensors(self, kind: str, tensors: dict) -> Path:
        """A safetensors file of named tensors (approximate caching's latents) under
        ``outputs/<kind>/<day>/``, written atomically like every output."""
        from safetensors.torch import save_file

        folder = self.root / kind / datetime.now().strftime("%Y-%m-%d")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{kind}-{uuid.uuid4().hex[:12]}.safetensors"
        return self._atomic(path, lambda p: save_file(tensors, p))

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

    # -- upkeep ------------------------------------------------------------------------
    def _walk(self) -> list[str]:
        """Every regular file under the root, as strings, from one ``os.scandir`` walk (no
        system call per file, no Path objects: they cost more than the walk for 100,000
        outputs). Symlinks, to files or folders, are not ours: never followed or touched."""
        found, folders = [], [str(self.root)]
        while folders:
            with os.scandir(folders.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        found.append(entry.path)
        return found

    def real_files(self) -> dict[str, str]:
        """Every file's real path -> its path under the root. No symlink is followed below
        the root, so a file's real path is the root's real path joined with its relative
        path: no ``resolve()`` (several system calls) per file."""
        real_root, root = str(self.real_root), str(self.root)
        return {real_root + path[len(root):]: path for path in self._walk()}

    def resolve_many(self, stored: Iterable[str], real_files: dict[str, str]) -> set[str]:
        """The real paths (strings) of the stored paths whose file is present, for a whole
        history: a plain ``outputs/...`` path is joined to the root's real path and looked
        up in ``real_files`` (no system call); anything unusual goes through ``resolve``."""
        real_root = str(self.real_root)
        prefix = self.root.name + "/"
        present = set()
        for path in stored:
            if path and path.startswith(prefix) and "/." not in path and "//" not in path and "\\" not in path:
                candidate = real_root + path[len(prefix) - 1:]
            else:
                resolved = self.resolve(path)
                candidate = str(resolved) if resolved is not None else None
            if candidate is not None and candidate in real_files:
                present.add(candidate)
        return present

    def owned_folders(self, referenced: Iterable[str]) -> set[str]:
        """A story row points at its story.html; the whole story folder (story.md, the
        step images) belongs to it. Real paths, as strings."""
        stories = str(self.real_root / STORIES)
        return {os.path.dirname(p) for p in referenced if os.path.dirname(os.path.dirname(p)) == stories}

    def orphans(self, referenced: Iterable[str], real_files: dict[str, str]) -> list[Path]:
        """Files under the root that no history row points to. ``referenced`` holds real
        paths as strings (``resolve_many``); ``real_files`` is the one walk of the folder
        (``real_files()``)."""
        referenced = set(referenced)
        folders = self.owned_folders(referenced)
        return [
            Path(path) for real, path in real_files.items()
            if os.path.basename(path).startswith(".tmp-")
            or (real not in referenced and os.path.dirname(real) not in folders)
        ]

    def move_to_trash(self, paths: Iterable[Path]) -> tuple[int, Path | None]:
        """Move files to DATA_DIR/trash/<time>/<same relative path>: the repair never
        deletes what it is not sure about; a person can look and restore."""
        paths = list(paths)
        if not paths:
            return 0, None
        trash = self.data_dir / "trash" / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        moved = 0
        for path in paths:
            target = trash / path.relative_to(self.root)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(path), str(target))
            except OSError as exc:  # one unmovable file must not stop the studio from starting
                log.warning("startup repair: could not move %s to the trash (%s); left in place", path, exc)
                continue
            moved += 1
            log.warning("startup repair: %s has no history row; moved to %s", path, target)
        return moved, trash


class ExportFolder:
    """One folder under the data dir for files made only to be downloaded (CSV, JSON,
    compare reports). Reused and pruned, so exports never pile up temp folders; it is
    served directly, so gradio keeps no copies of its own."""

    def __init__(self, folder: str | os.PathLike, keep: int = 20, max_age_s: float = 3600.0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.keep, self.max_age_s = keep, max_age_s

    def new_file(self, name: str) -> Path:
        """A fresh, unique path for ``name`` (two users exporting at once never share a
        file); old exports beyond ``keep`` or older than ``max_age_s`` are removed."""
        self.prune()
        stem, suffix = os.path.splitext(Path(name).name)
        return self.folder / f"{stem}-{uuid.uuid4().hex[:8]}{suffix}"

    def prune(self) -> None:
        stamped = []
        for path in self.folder.iterdir():
            try:
                if path.is_file():
                    stamped.append((path.stat().st_mtime, path))
            except OSError:  # removed meanwhile by another request's prune
                continue
        stamped.sort(reverse=True)
        now = time.time()
        for index, (mtime, path) in enumerate(stamped):
            if index >= self.keep or now - mtime > self.max_age_s:
                path.unlink(missing_ok=True)
